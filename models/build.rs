//! Tells the tests whether the shared PneumoniaMNIST file is present (`build-support/`).

#[path = "../build-support/shared_data.rs"]
mod shared_data;

fn main() {
    shared_data::emit();
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=../build-support/shared_data.rs");
}
