//! Property-based tests of the readers and parsers a user's files go through: on generated input
//! they never panic, well-formed files read back exactly what was written, and every refusal is a
//! typed error naming the file.

use adapterkit::data::{normalise_label, read_examples, Columns, Format};
use adapterkit::{BertConfig, Error};
use proptest::prelude::*;
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ak-prop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn cols(header: bool) -> Columns {
    Columns {
        text: if header { "text".into() } else { "0".into() },
        pair: None,
        label: if header { "label".into() } else { "1".into() },
        header,
        drop_empty: false,
    }
}

/// Texts with what breaks naive readers: commas, quotes, newlines, tabs, non-ASCII.
fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z ,\"\n\té€😀]{1,30}")
        .unwrap()
        .prop_filter("not blank", |s| !s.trim().is_empty())
}

fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("pos".to_string()),
        Just("neg".to_string()),
        Just("0".to_string()),
        Just("1".to_string()),
        Just("neutral".to_string()),
    ]
}

fn csv_field(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_in_any_format_give_examples_or_a_data_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        fmt in prop_oneof![Just(Format::Csv), Just(Format::Tsv), Just(Format::Jsonl), Just(Format::Json)],
        header in any::<bool>(),
    ) {
        let p = scratch("any.bin");
        std::fs::write(&p, &bytes).unwrap();
        match read_examples(&p, fmt, &cols(header)) {
            Ok(ex) => prop_assert!(!ex.is_empty()),
            Err(Error::Data { path, .. }) => prop_assert_eq!(path, p),
            Err(e) => prop_assert!(false, "not a data error: {e}"),
        }
    }

    #[test]
    fn quoted_csv_reads_back_what_was_written(rows in proptest::collection::vec((text(), label()), 1..30)) {
        let mut s = String::from("text,label\n");
        for (t, l) in &rows {
            s.push_str(&format!("{},{}\n", csv_field(t), l));
        }
        let p = scratch("rt.csv");
        std::fs::write(&p, s).unwrap();
        let ex = read_examples(&p, Format::Csv, &cols(true)).unwrap();
        prop_assert_eq!(ex.len(), rows.len());
        for (e, (t, l)) in ex.iter().zip(&rows) {
            prop_assert_eq!(&e.text, t.trim());
            prop_assert_eq!(&e.label, l);
        }
    }

    #[test]
    fn jsonl_and_csv_of_the_same_rows_agree(rows in proptest::collection::vec((text(), label()), 1..30)) {
        let mut csv = String::from("text,label\n");
        let mut jsonl = String::new();
        for (i, (t, l)) in rows.iter().enumerate() {
            csv.push_str(&format!("{},{}\n", csv_field(t), l));
            // Numbers as JSON numbers, written as floats on odd rows: they are the same class.
            let label = match l.parse::<i64>() {
                Ok(n) if i % 2 == 1 => serde_json::json!(n as f64),
                Ok(n) => serde_json::json!(n),
                Err(_) => serde_json::json!(format!(" {l} ")),
            };
            jsonl.push_str(&serde_json::json!({"text": t, "label": label}).to_string());
            jsonl.push('\n');
        }
        let (pc, pj) = (scratch("same.csv"), scratch("same.jsonl"));
        std::fs::write(&pc, csv).unwrap();
        std::fs::write(&pj, jsonl).unwrap();
        let json_cols = Columns { text: "text".into(), label: "label".into(), ..cols(false) };
        let a = read_examples(&pc, Format::Csv, &cols(true)).unwrap();
        let b = read_examples(&pj, Format::Jsonl, &json_cols).unwrap();
        prop_assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            prop_assert_eq!(&x.label, &y.label);
            prop_assert_eq!(x.text.trim(), y.text.trim());
        }
    }

    #[test]
    fn an_unquoted_comma_is_an_error_naming_its_line(rows in proptest::collection::vec(label(), 2..20), at in 0usize..20) {
        let at = at % rows.len();
        let mut s = String::from("text,label\n");
        for (i, l) in rows.iter().enumerate() {
            let t = if i == at { "one, two" } else { "plain" };
            s.push_str(&format!("{t},{l}\n"));
        }
        let p = scratch("comma.csv");
        std::fs::write(&p, s).unwrap();
        let e = read_examples(&p, Format::Csv, &cols(true)).unwrap_err().to_string();
        let line = format!("comma.csv:{}:", at + 2);
        prop_assert!(e.contains(&line), "{}", e);
    }

    #[test]
    fn label_normalisation_is_idempotent_and_merges_float_integers(n in -1_000_000i64..1_000_000, s in "[ a-z0-9.eE+-]{0,12}") {
        prop_assert_eq!(normalise_label(&format!("{n}.0")), n.to_string());
        prop_assert_eq!(normalise_label(&format!(" {n} ")), n.to_string());
        let once = normalise_label(&s);
        prop_assert_eq!(normalise_label(&once), once.clone());
        prop_assert_eq!(once.trim(), once.as_str());
    }

    #[test]
    fn configs_with_any_sizes_load_only_within_bounds(
        layers in any::<u32>(), hidden in any::<u32>(), heads in 0u32..64, vocab in any::<u32>(),
        eps in prop_oneof![Just(-1.0f64), Just(0.0), Just(1e-12), Just(2.0), Just(f64::MAX)],
        drop in -1.0f64..2.0,
    ) {
        let v = serde_json::json!({
            "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": 64, "max_position_embeddings": 64,
            "layer_norm_eps": eps, "hidden_dropout_prob": drop, "attention_probs_dropout_prob": 0.1,
            "pad_token_id": 0,
        });
        let p = scratch("config.json");
        std::fs::write(&p, v.to_string()).unwrap();
        match BertConfig::from_file(&p) {
            Ok(c) => {
                prop_assert!(c.num_hidden_layers >= 1 && c.num_hidden_layers <= 1024);
                prop_assert!(c.hidden_size >= 1 && c.hidden_size <= 65536);
                prop_assert!(c.hidden_size % c.num_attention_heads == 0);
                prop_assert!(c.layer_norm_eps > 0.0 && c.layer_norm_eps < 1.0);
                prop_assert!((0.0..1.0).contains(&c.hidden_dropout_prob));
            }
            Err(Error::Config { context, .. }) => prop_assert!(context.ends_with("config.json")),
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
    }

    #[test]
    fn adapter_configs_of_any_values_parse_or_name_the_field(
        rf in prop_oneof![Just(serde_json::json!(16)), Just(serde_json::json!(-3)), Just(serde_json::json!(0)), Just(serde_json::json!("x")), Just(serde_json::json!(1e9))],
        nl in prop_oneof![Just("relu"), Just("gelu"), Just("nope"), Just("")],
        mh in any::<bool>(),
        leave in proptest::collection::vec(0i64..12, 0..4),
    ) {
        let v = serde_json::json!({
            "mh_adapter": mh, "output_adapter": true, "reduction_factor": rf,
            "non_linearity": nl, "original_ln_before": true, "original_ln_after": true,
            "residual_before_ln": true, "leave_out": leave,
        });
        match adapterkit::format::hub::adapter_config_from_hub("cfg.json", &v, 32, 2) {
            Ok(a) => {
                prop_assert!(a.bottleneck >= 1);
                prop_assert!(a.leave_out.iter().all(|&l| l < 2));
            }
            Err(Error::Config { context, field, .. }) => {
                prop_assert_eq!(context, "cfg.json");
                prop_assert!(!field.is_empty());
            }
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
    }

    #[test]
    fn any_bytes_as_safetensors_are_refused_or_read(bytes in proptest::collection::vec(any::<u8>(), 0..200), len in 0u64..300) {
        let mut b = len.to_le_bytes().to_vec();
        b.extend(bytes);
        let p = scratch("w.safetensors");
        std::fs::write(&p, &b).unwrap();
        if let Err(e) = adapterkit::io::load_tensors(&p) {
            prop_assert!(matches!(e, Error::Data { .. }), "{e}");
        }
    }
}
