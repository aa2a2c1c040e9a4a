//! `adapterkit eval`: a saved adapter directory on a data set split.

use super::*;

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// Adapter directory written by `train`.
    #[arg(long)]
    adapter: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Which split to score.
    #[arg(long, default_value = "test", value_parser = ["train", "dev", "test"])]
    split: String,
    /// Skip the adapters of these layers at inference (comma-separated), AdapterDrop-style.
    #[arg(long, value_delimiter = ',')]
    skip_adapter_layers: Vec<usize>,
    /// Number format of the frozen projections' products: f32, or fp16 (fp16 products with f32
    /// sums, on CPUs with AVX512_FP16; about 4e-3 from f32 on MiniLM's hidden states).
    #[arg(long, default_value = "f32")]
    precision: adapterkit::Precision,
}

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    let mut base = load_base(&a.model)?;
    let task = load_task(&base, &a.adapter)?;
    super::hold_model_once(&mut base, &task)?;
    let base = base
        .with_precision(a.precision)
        .with_context(|| format!("--precision {}", a.precision))?;
    let data = a.data.load(
        &adapterkit::default_home(),
        task.head.kind == HeadKind::Regression,
    )?;
    if task.head.kind == HeadKind::Classification && task.head.labels != data.labels {
        bail!(
            "the adapter's classes {:?} differ from the data's {:?}",
            task.head.labels,
            data.labels
        );
    }
    let set = match a.split.as_str() {
        "train" => &data.train,
        "dev" => &data.dev,
        _ => &data.test,
    };
    let ev = evaluate(&base, &task, set, 64, &a.skip_adapter_layers)?;
    println!(
        "{}",
        json!({"adapter": a.adapter, "task": data.name, "split": a.split,
               "skip_adapter_layers": a.skip_adapter_layers, "metrics": ev.metrics})
    );
    Ok(())
}
