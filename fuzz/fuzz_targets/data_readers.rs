//! Any bytes as a data file in each format, with and without a header: examples, or a data error
//! naming the file; never a panic.
#![no_main]
use adapterkit::data::{read_examples, Columns, Format};
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("data");
    std::fs::write(&p, data).unwrap();
    for header in [false, true] {
        let cols = Columns {
            text: if header { "text".into() } else { "0".into() },
            pair: if header { Some("pair".into()) } else { None },
            label: if header { "label".into() } else { "1".into() },
            header,
            drop_empty: false,
        };
        for fmt in [Format::Csv, Format::Tsv, Format::Jsonl, Format::Json] {
            match read_examples(&p, fmt, &cols) {
                Ok(ex) => assert!(!ex.is_empty()),
                Err(adapterkit::Error::Data { .. }) => {}
                Err(e) => panic!("unexpected error kind: {e}"),
            }
        }
    }
});
