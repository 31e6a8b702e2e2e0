//! `mae-train export-npz`: a MedMNIST `.npz` file written out as an ImageFolder tree of PNG
//! files (`data::export`).

use std::process::ExitCode;

use crate::cli::ExportNpzArgs;
use crate::data::export::npz_to_image_folder;
use crate::engine::device::progress;

pub fn export_npz(a: &ExportNpzArgs) -> anyhow::Result<ExitCode> {
    let bar = progress(0, "export");
    let exported = npz_to_image_folder(
        &a.data_path,
        &a.output,
        &a.splits,
        a.class_names.as_deref(),
        &mut |done, total| {
            if done == 1 {
                bar.set_length(total as u64);
            }
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    println!("{exported}");
    Ok(ExitCode::SUCCESS)
}
