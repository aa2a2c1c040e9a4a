//! Any bytes as `adapter_config.json` (AdapterHub's `BnConfig` in its envelope): an adapter
//! configuration that fits the base, or an error naming the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    match adapterkit::format::hub::adapter_config_from_hub("adapter_config.json", &value, 32, 2) {
        Ok(a) => {
            assert!(a.bottleneck >= 1);
            assert!(a.leave_out.iter().all(|&l| l < 2));
        }
        Err(e) => assert!(e.to_string().contains("adapter_config.json"), "{e}"),
    }
});
