//! Any bytes as a weight file: read, or refused with a data error naming the file; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("w.safetensors");
    std::fs::write(&p, data).unwrap();
    match adapterkit::io::load_tensors(&p) {
        Ok(_) | Err(adapterkit::Error::Data { .. }) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
    }
});
