//! AdapterHub's named adapter configurations (`seq_bn`, `double_seq_bn`, `par_bn`, `compacter`,
//! `prefix_tuning`, `lora`, `ia3`, …) and its configuration strings `name[key=value, …]`, read as `adapters.AdapterConfig.load` reads them:
//! the preset's keys, then each `key=value` (a Python literal) over them.

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};

/// The presets we implement, by every name AdapterHub accepts for them.
pub const PRESETS: &[&str] = &[
    "seq_bn",
    "pfeiffer",
    "double_seq_bn",
    "houlsby",
    "par_bn",
    "parallel",
    "scaled_par_bn",
    "scaled_parallel",
    "compacter",
    "compacter++",
    "prefix_tuning",
    "prefix_tuning_flat",
    "lora",
    "ia3",
];

/// AdapterHub presets of methods other than bottleneck adapters (refused by name).
const OTHER_PRESETS: &[&str] = &[
    "seq_bn_inv",
    "double_seq_bn_inv",
    "pfeiffer+inv",
    "houlsby+inv",
    "prompt_tuning",
    "mtl_lora",
    "vera",
    "dora",
    "dvora",
    "loreft",
    "noreft",
    "direft",
    "mam",
    "unipelt",
];

/// The configuration keys of AdapterHub's preset `name` (adapters 1.3), or `None` if `name` is
/// not one of [`PRESETS`].
pub fn preset(name: &str) -> Option<Value> {
    let (mh, ln_before, nl, rf, extra) = match name {
        "lora" => {
            return Some(json!({
                "architecture": "lora", "selfattn_lora": true, "intermediate_lora": false,
                "output_lora": false, "attn_matrices": ["q", "v"], "r": 8, "alpha": 8,
                "dropout": 0.0, "composition_mode": "add", "init_weights": "lora",
            }))
        }
        "prefix_tuning" | "prefix_tuning_flat" => {
            return Some(json!({
                "architecture": "prefix_tuning", "encoder_prefix": true, "cross_prefix": true,
                "leave_out": [], "flat": name == "prefix_tuning_flat", "prefix_length": 30,
                "bottleneck_size": 512, "non_linearity": "tanh", "dropout": 0.0,
                "use_gating": false, "shared_gating": true,
            }))
        }
        "ia3" => {
            return Some(json!({
                "architecture": "lora", "selfattn_lora": true, "intermediate_lora": true,
                "output_lora": false, "attn_matrices": ["k", "v"], "r": 1, "alpha": 1,
                "dropout": 0.0, "composition_mode": "scale", "init_weights": "ia3",
            }))
        }
        "seq_bn" | "pfeiffer" => (false, true, "relu", json!(16), json!({})),
        "double_seq_bn" | "houlsby" => (true, false, "swish", json!(16), json!({})),
        "par_bn" | "parallel" => (
            false,
            false,
            "relu",
            json!(2),
            json!({"is_parallel": true, "scaling": 4.0, "init_weights": "mam_adapter"}),
        ),
        "scaled_par_bn" | "scaled_parallel" => (
            false,
            false,
            "relu",
            json!(2),
            json!({"is_parallel": true, "scaling": "learned", "init_weights": "mam_adapter"}),
        ),
        // Compacter is Houlsby's arrangement with PHM projections, Compacter++ Pfeiffer's.
        "compacter" => (true, false, "gelu", json!(32), json!({"phm_layer": true})),
        "compacter++" => (false, true, "gelu", json!(32), json!({"phm_layer": true})),
        _ => return None,
    };
    let mut v = json!({
        "mh_adapter": mh, "output_adapter": true, "reduction_factor": rf, "non_linearity": nl,
        "original_ln_before": ln_before, "original_ln_after": true, "residual_before_ln": true,
        "init_weights": "bert",
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    Some(v)
}

/// Reads `spec` as an AdapterHub configuration string: `NAME` or `NAME[key=value, …]` with `NAME`
/// a preset. `Ok(None)` when `spec` has no brackets and names no preset (it may be a
/// file path); an error names the part of `spec` that is wrong.
pub fn from_string(spec: &str) -> Result<Option<Value>> {
    let ctx = format!("adapter configuration `{spec}`");
    let bad = |field: &str, msg: String| Err(Error::config(&ctx, field, msg));
    let s = spec.trim();
    if s.contains('|') {
        return bad(
            "|",
            "configuration unions (e.g. `prefix_tuning|par_bn`) are not supported".into(),
        );
    }
    let (name, kvs) = match s.find('[') {
        Some(i) => match s.strip_suffix(']') {
            Some(body) => (s[..i].trim(), Some(&body[i + 1..])),
            None => return bad("]", "expected `NAME[key=value, …]` ending in `]`".into()),
        },
        None => (s, None),
    };
    let Some(mut value) = preset(name) else {
        if OTHER_PRESETS.contains(&name) {
            return bad(
                name,
                format!(
                    "AdapterHub's `{name}` is not implemented; the presets are {}",
                    PRESETS.join(", ")
                ),
            );
        }
        if kvs.is_some() {
            return bad(
                name,
                format!("not a preset: expected one of {}", PRESETS.join(", ")),
            );
        }
        return Ok(None);
    };
    if let (Some(kvs), Some(obj)) = (kvs, value.as_object_mut()) {
        let mut p = Literal {
            s: kvs.as_bytes(),
            i: 0,
        };
        for (k, v) in p.pairs().map_err(|m| Error::config(&ctx, name, m))? {
            obj.insert(k, v);
        }
    }
    Ok(Some(value))
}

/// A reader of the `key=value, …` list inside the brackets, values as Python literals (numbers,
/// `True` / `False` / `None`, quoted strings, lists and dicts of them).
struct Literal<'a> {
    s: &'a [u8],
    i: usize,
}

type Parsed<T> = std::result::Result<T, String>;

impl Literal<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Parsed<()> {
        match self.peek() {
            Some(x) if x == c => {
                self.i += 1;
                Ok(())
            }
            other => Err(format!(
                "expected `{}` at character {}, found {}",
                c as char,
                self.i + 1,
                other.map_or("the end".to_string(), |x| format!("`{}`", x as char))
            )),
        }
    }

    fn word(&mut self) -> &str {
        self.skip_ws();
        let start = self.i;
        while self
            .s
            .get(self.i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+'))
        {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i]).unwrap_or("")
    }

    fn pairs(&mut self) -> Parsed<Vec<(String, Value)>> {
        let mut out = Vec::new();
        while self.peek().is_some() {
            let key = self.word().to_string();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("expected a key at character {}", self.i + 1));
            }
            self.expect(b'=')?;
            out.push((key, self.value()?));
            if self.peek().is_some() {
                self.expect(b',')?;
            }
        }
        Ok(out)
    }

    fn value(&mut self) -> Parsed<Value> {
        match self.peek() {
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                while self.peek() != Some(b']') {
                    v.push(self.value()?);
                    if self.peek() != Some(b']') {
                        self.expect(b',')?;
                    }
                }
                self.i += 1;
                Ok(Value::Array(v))
            }
            Some(b'{') => {
                self.i += 1;
                let mut m = Map::new();
                while self.peek() != Some(b'}') {
                    let k = match self.value()? {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        other => return Err(format!("`{other}` cannot be a dict key")),
                    };
                    self.expect(b':')?;
                    m.insert(k, self.value()?);
                    if self.peek() != Some(b'}') {
                        self.expect(b',')?;
                    }
                }
                self.i += 1;
                Ok(Value::Object(m))
            }
            Some(q @ (b'\'' | b'"')) => {
                let start = self.i + 1;
                let end = self.s[start..]
                    .iter()
                    .position(|&c| c == q)
                    .ok_or_else(|| format!("unterminated string at character {start}"))?;
                self.i = start + end + 1;
                Ok(Value::String(
                    String::from_utf8_lossy(&self.s[start..start + end]).into_owned(),
                ))
            }
            Some(_) => {
                let at = self.i + 1;
                let w = self.word().to_string();
                match w.as_str() {
                    "True" | "true" => Ok(Value::Bool(true)),
                    "False" | "false" => Ok(Value::Bool(false)),
                    "None" => Ok(Value::Null),
                    _ => {
                        if let Ok(i) = w.parse::<i64>() {
                            Ok(json!(i))
                        } else if let Some(f) = w.parse::<f64>().ok().filter(|f| f.is_finite()) {
                            Ok(json!(f))
                        } else {
                            Err(format!(
                                "`{w}` at character {at} is not a Python literal (number, \
                                 True/False/None, quoted string, list or dict)"
                            ))
                        }
                    }
                }
            }
            None => Err("a value is missing at the end".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_override_preset_keys_as_adapterhub_reads_them() {
        let v = from_string("par_bn[reduction_factor=6, scaling='learned', leave_out=[0, 1]]")
            .unwrap()
            .unwrap();
        assert_eq!(v["reduction_factor"], json!(6));
        assert_eq!(v["scaling"], json!("learned"));
        assert_eq!(v["leave_out"], json!([0, 1]));
        assert_eq!(v["is_parallel"], json!(true));
        let v = from_string("seq_bn[reduction_factor={'default': 8, '0': 4}, ln_after=True]")
            .unwrap()
            .unwrap();
        assert_eq!(v["reduction_factor"], json!({"default": 8, "0": 4}));
        assert_eq!(v["ln_after"], json!(true));
        assert_eq!(from_string("par_bn").unwrap(), preset("par_bn"));
        let v = from_string("lora[r=4, alpha=16, attn_matrices=['q','k','v']]")
            .unwrap()
            .unwrap();
        assert_eq!(v["architecture"], json!("lora"));
        assert_eq!((v["r"].clone(), v["alpha"].clone()), (json!(4), json!(16)));
        assert_eq!(v["attn_matrices"], json!(["q", "k", "v"]));
        let v = from_string("compacter++[phm_dim=2, shared_phm_rule=False]")
            .unwrap()
            .unwrap();
        assert_eq!(v["phm_layer"], json!(true));
        assert_eq!(v["original_ln_before"], json!(true));
        assert_eq!(
            (v["phm_dim"].clone(), v["shared_phm_rule"].clone()),
            (json!(2), json!(false))
        );
        // Not a preset and no brackets: maybe a file.
        assert!(from_string("my_config.json").unwrap().is_none());
    }

    #[test]
    fn bad_strings_are_named() {
        for (spec, shown) in [
            ("prompt_tuning[prompt_length=10]", "not implemented"),
            ("mam", "not implemented"),
            ("prefix_tuning|par_bn", "unions"),
            ("nonsense[r=8]", "not a preset"),
            ("par_bn[reduction_factor=]", "missing"),
            ("par_bn[reduction_factor=6", "`]`"),
            ("par_bn[reduction_factor 6]", "expected `=`"),
            ("par_bn[scaling=wild]", "not a Python literal"),
            ("par_bn[leave_out=[0, 1]", "the end"),
        ] {
            let e = from_string(spec).expect_err(spec).to_string();
            assert!(e.contains(shown) && e.contains(spec), "{spec}: {e}");
        }
    }
}
