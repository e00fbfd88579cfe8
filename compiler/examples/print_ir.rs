//! Prints the literal and canonical IR of a checkpoint, and what each pass did.
//!
//! `cargo run -p ngpt-compiler --example print_ir -- tests/fixtures/nv-tiny`

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/nv-tiny".into());
    let ckpt = ngpt_compiler::import::load(path.as_ref())?;
    let mut g = ngpt_compiler::graph::literal(&ckpt)?;
    println!("== literal ({} nodes)\n{g}", g.nodes.len());
    let records = ngpt_compiler::passes::run(&mut g, &Default::default())?;
    for r in &records {
        println!(
            "pass {:<14} {:>3} rewrites {:?}",
            r.name, r.rewrites, r.skipped
        );
    }
    println!("== canonical ({} nodes)\n{g}", g.nodes.len());
    Ok(())
}
