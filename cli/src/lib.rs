//! The CLI's reading side as a library: the trace stream rebuilt into processes, the reports made
//! from them, and recovery from ring files. The `leakhunt` binary drives it; the benches measure
//! it.
#![forbid(unsafe_code)]

pub mod process;
pub mod recover;
pub mod report;
pub mod series;
