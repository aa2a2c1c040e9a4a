//! Any bytes as `config.json`: a configuration within bounds, or an error naming the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("config.json");
    std::fs::write(&p, data).unwrap();
    match adapterkit::BertConfig::from_file(&p) {
        Ok(c) => {
            assert!(c.num_hidden_layers >= 1 && c.num_hidden_layers <= 1024);
            assert!(c.hidden_size % c.num_attention_heads == 0);
            assert!(c.layer_norm_eps > 0.0 && c.layer_norm_eps < 1.0);
            assert!((c.pad_token_id as usize) < c.vocab_size);
        }
        Err(e) => assert!(e.to_string().contains("config.json"), "{e}"),
    }
});
