//! `adapterkit split`: a data set's fixed split as JSONL files for other tools.

use super::*;

#[derive(Args)]
pub(crate) struct SplitArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Numeric labels (regression).
    #[arg(long)]
    regression: bool,
    /// Output directory (gets train.jsonl, dev.jsonl, test.jsonl).
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn split(a: SplitArgs) -> Result<()> {
    let data = a.data.load(&adapterkit::default_home(), a.regression)?;
    for (name, set) in [
        ("train", &data.train),
        ("dev", &data.dev),
        ("test", &data.test),
    ] {
        let mut text = String::new();
        for (i, (t, p)) in set.inputs.iter().enumerate() {
            let label = if a.regression {
                json!(set.targets[i])
            } else {
                json!(data.labels[set.labels[i]])
            };
            text.push_str(&json!({"text": t, "pair": p, "label": label}).to_string());
            text.push('\n');
        }
        let path = a.out.join(format!("{name}.jsonl"));
        adapterkit::io::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{}: {} train / {} dev / {} test written to {} (split fingerprint {})",
        data.name,
        data.train.len(),
        data.dev.len(),
        data.test.len(),
        a.out.display(),
        data.split
            .as_ref()
            .map(|s| s.fingerprint())
            .unwrap_or_else(|| "given files".into())
    );
    Ok(())
}
