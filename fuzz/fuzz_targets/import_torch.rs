//! `ckpt.pt` (torch zip + pickle) through `ngpt_compiler::import::load`: any bytes must give
//! a checkpoint or an error, never a panic, an abort or an out-of-memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| ngpt_fuzz::scratch_dir("import_torch"));
    let _ = ngpt_fuzz::import_torch(data, dir);
});
