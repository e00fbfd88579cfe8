//! The compiler's integration tests, one module per concern, linked as one test binary.

// The measured-error baselines, shared with the root package's tests.
#[path = "../../../tests/it/common/baseline.rs"]
mod baseline;
// The ONNX tests run the exports in tract (the default feature `tract`).
mod nous;
#[cfg(feature = "tract")]
mod onnx;
mod passes;
#[cfg(feature = "tract")]
mod quantize;
