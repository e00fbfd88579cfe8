//! Compiles the crate's .proto files with protox (pure Rust, no system protoc) and generates
//! Rust types for them with prost-build. Each file's package becomes one generated module.

use std::path::Path;

/// The .proto files of this crate, relative to the crate root (which is also the include dir).
const PROTOS: &[&str] = &["onnx.proto", "plan.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&root);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile(PROTOS, [root])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
