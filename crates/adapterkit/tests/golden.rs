//! Forward parity with PyTorch `BertModel` on committed golden fixtures.

mod common;
use adapterkit::{BaseModel, ForwardOptions};
use common::*;

#[test]
fn tiny_bert_matches_pytorch_from_safetensors_and_pickle() {
    let g = golden(&tiny_dir().join("golden.safetensors"));
    let batch = golden_batch(&g);
    let base = tiny_base();
    let h = base
        .encode(None, &batch, &mut ForwardOptions::default())
        .unwrap();
    let d = max_abs_diff(&h, &g["last_hidden_state"]);
    assert!(d < 1e-4, "last_hidden_state max abs diff {d}");
    let pooled = base.pooler(None, &h).unwrap();
    let dp = max_abs_diff(&pooled, &g["pooler_output"]);
    assert!(dp < 1e-4, "pooler_output max abs diff {dp}");

    // The same weights from pytorch_model.bin (with `bert.` prefixes) give the same output.
    let dir = std::env::temp_dir().join(format!("ak-pickle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "vocab.txt", "pytorch_model.bin"] {
        std::fs::copy(tiny_dir().join(f), dir.join(f)).unwrap();
    }
    let from_bin = BaseModel::load(&dir).unwrap();
    let h2 = from_bin
        .encode(None, &batch, &mut ForwardOptions::default())
        .unwrap();
    assert_eq!(max_abs_diff(&h, &h2), 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_tokenizer_from_vocab_matches_hf() {
    let g = golden(&tiny_dir().join("golden.safetensors"));
    let inputs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny_dir().join("golden_inputs.json")).unwrap(),
    )
    .unwrap();
    let texts = inputs["texts"].as_array().unwrap();
    let pairs = inputs["pairs"].as_array().unwrap();
    let rows: Vec<(String, Option<String>)> = texts
        .iter()
        .zip(pairs)
        .map(|(t, p)| {
            (
                t.as_str().unwrap().to_string(),
                p.as_str().map(String::from),
            )
        })
        .collect();
    let base = tiny_base();
    let enc = base.tokenizer.encode_all(&rows, 64).unwrap();
    let ids = g["input_ids"].to_vec2::<i64>().unwrap();
    let types = g["token_type_ids"].to_vec2::<i64>().unwrap();
    for (i, (e_ids, e_types)) in enc.iter().enumerate() {
        let n = e_ids.len();
        let want: Vec<u32> = ids[i][..n].iter().map(|&x| x as u32).collect();
        assert_eq!(e_ids, &want, "row {i}");
        assert!(
            ids[i][n..].iter().all(|&x| x == 0),
            "row {i} length differs"
        );
        let want_t: Vec<u32> = types[i][..n].iter().map(|&x| x as u32).collect();
        assert_eq!(e_types, &want_t, "row {i} token types");
    }
}

#[test]
fn minilm_matches_pytorch_on_real_sentences() {
    let home = assets_home();
    let base = BaseModel::load(&home.join("models/all-MiniLM-L6-v2")).unwrap();
    let g = golden(&fixtures().join("minilm-golden.safetensors"));
    let batch = golden_batch(&g);
    let h = base
        .encode(None, &batch, &mut ForwardOptions::default())
        .unwrap();
    let d = max_abs_diff_masked(&h, &g["last_hidden_state"], &batch.mask);
    assert!(d < 1e-4, "MiniLM last_hidden_state max abs diff {d}");
    let dp = max_abs_diff(&base.pooler(None, &h).unwrap(), &g["pooler_output"]);
    assert!(dp < 1e-4, "MiniLM pooler max abs diff {dp}");

    // Our tokenizer gives HF's ids on the same sentences.
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("minilm-golden.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<(String, Option<String>)> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t.as_str().unwrap().to_string(), None))
        .collect();
    let enc = base.tokenizer.encode_all(&rows, 128).unwrap();
    let ids = g["input_ids"].to_vec2::<i64>().unwrap();
    for (i, (e, _)) in enc.iter().enumerate() {
        let want: Vec<u32> = ids[i][..e.len()].iter().map(|&x| x as u32).collect();
        assert_eq!(e, &want, "row {i}");
    }
}

/// fp16 precision (frozen projections in fp16 with f32 sums) stays near PyTorch's f32 forward on
/// the same sentences; on a CPU without AVX512_FP16 asking for it is a clear error.
#[test]
fn minilm_in_fp16_stays_near_pytorch() {
    let home = assets_home();
    let base = BaseModel::load(&home.join("models/all-MiniLM-L6-v2")).unwrap();
    let half = match base.with_precision(adapterkit::Precision::F16) {
        Ok(half) => half,
        Err(e) => {
            assert!(!adapterkit::kernels::half::available(), "{e}");
            assert!(e.to_string().contains("AVX512_FP16"), "{e}");
            return;
        }
    };
    assert!(half.weights.packed_bytes() > base.weights.packed_bytes());
    let g = golden(&fixtures().join("minilm-golden.safetensors"));
    let batch = golden_batch(&g);
    let run = |m: &BaseModel| {
        m.encode(None, &batch, &mut ForwardOptions::default())
            .unwrap()
    };
    let (h16, h32) = (run(&half), run(&base));
    let d16 = max_abs_diff_masked(&h16, &g["last_hidden_state"], &batch.mask);
    let d32 = max_abs_diff_masked(&h32, &g["last_hidden_state"], &batch.mask);
    eprintln!("max abs diff to PyTorch: fp16 {d16}, f32 {d32}");
    // The fp16 products really ran (not the f32 fallback), and their rounding stays small
    // against hidden states of magnitude ~1.
    assert!(
        d16 > 10.0 * d32,
        "fp16 {d16} against f32 {d32}: no fp16 product ran?"
    );
    assert!(
        d16 < 1e-2,
        "MiniLM fp16 last_hidden_state max abs diff {d16}"
    );
    let p16 = base.pooler(None, &h16).unwrap();
    let dp = max_abs_diff(&p16, &g["pooler_output"]);
    assert!(dp < 1e-2, "MiniLM fp16 pooler max abs diff {dp}");
}
