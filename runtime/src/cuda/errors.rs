//! The CUDA executor's errors: one line each, naming plan-cuda or the step that failed,
//! with the driver's own name and description of what went wrong.

use cudarc::driver::DriverError;

use crate::error::Error;

pub(super) fn plan_cuda_err(problem: impl Into<String>) -> Error {
    Error::Request {
        what: "plan-cuda".into(),
        problem: problem.into(),
    }
}

pub(super) fn step_err(step: &str, problem: impl Into<String>) -> Error {
    Error::Step {
        step: step.to_string(),
        problem: problem.into(),
    }
}

/// A driver error as its CUDA name and description.
pub(super) fn drv(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// Setup failures: `what` failed with a driver error.
pub(super) fn setup(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| plan_cuda_err(format!("{what}: {}", drv(e)))
}
