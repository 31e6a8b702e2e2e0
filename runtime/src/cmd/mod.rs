//! One file per command, each taking its parsed flags to an exit code; none imports another.

pub mod bench;
pub mod calibrate;
pub mod dicom_echo;
pub mod dicom_send;
pub mod eval;
pub mod info;
pub mod predict;
pub mod serve;
