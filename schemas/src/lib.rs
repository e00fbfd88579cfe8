//! Wire formats of ngpt. Filled by the ONNX and plan issues.
