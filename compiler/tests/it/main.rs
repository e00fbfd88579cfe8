//! The compiler's integration tests, one module per concern, linked as one test binary.

mod onnx;
mod passes;
