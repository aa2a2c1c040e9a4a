//! Any bytes as `adapter_config.json` (AdapterHub's `BnConfig`, `LoRAConfig` or
//! `PrefixTuningConfig` in its envelope, or a preset string): an adapter configuration that fits
//! the base, or an error naming the file.
#![no_main]
use adapterkit::adapter::AdapterMethod;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The tiny test BERT's configuration (2 layers, hidden 32, FFN 64).
fn base() -> &'static adapterkit::BertConfig {
    static BASE: OnceLock<adapterkit::BertConfig> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        adapterkit::BertConfig::from_file(
            &dir.join("../crates/adapterkit/tests/fixtures/tiny-bert/config.json"),
        )
        .expect("the tiny BERT's config.json")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A configuration string (`par_bn[reduction_factor=4]`): a preset's keys or a named error.
    let preset = adapterkit::format::preset::from_string(text);
    let value = match preset {
        Ok(Some(v)) => v,
        Ok(None) | Err(adapterkit::Error::Config { .. }) => {
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) => v,
                Err(_) => return,
            }
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    };
    match adapterkit::format::hub::method_from_hub("adapter_config.json", &value, base()) {
        Ok(AdapterMethod::Bottleneck(a)) => {
            assert!(a.bottleneck >= 1);
            assert!(a.leave_out.iter().all(|&l| l < 2));
            if let Some(p) = &a.phm {
                // Every PHM layer's widths split into phm_dim blocks.
                assert!(p.phm_dim >= 1 && 32 % p.phm_dim == 0);
                assert!((0..2).all(|l| a.bottleneck_at(l) % p.phm_dim == 0));
            }
        }
        Ok(AdapterMethod::Prefix(p)) => {
            assert!(p.prefix_length >= 1 && (p.flat || p.bottleneck_size >= 1));
            assert!(!p.layers(2).is_empty());
        }
        Ok(AdapterMethod::Lora(l)) => {
            assert!(l.r >= 1 && !l.targets.is_empty());
            assert!((0..2).any(|layer| l.has_layer(layer)));
        }
        Err(e) => assert!(e.to_string().contains("adapter_config.json"), "{e}"),
    }
});
