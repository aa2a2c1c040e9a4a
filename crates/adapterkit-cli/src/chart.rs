//! The suite's charts (a line plot with a log x axis and a heat map), drawn with `plotters` and
//! written as SVG and as PNG. The PNG's text is rendered with DejaVu Sans from the `dejavu`
//! crate, so no system fonts or font files are needed.

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One labelled series of (x, y, point label) points.
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points; drawn in x order and joined by a line.
    pub points: Vec<(f64, f64, String)>,
    /// Half-heights of error bars, one per point in `points`' order; empty for none.
    pub errors: Vec<f64>,
}

/// What a chart shows; [`write`] draws it.
pub enum Chart {
    /// Series over x (log-scaled when `log_x`), with error bars and point labels.
    Lines {
        /// Caption.
        title: String,
        /// X axis description.
        xlabel: String,
        /// Y axis description.
        ylabel: String,
        /// The series.
        series: Vec<Series>,
        /// Logarithmic x axis.
        log_x: bool,
    },
    /// `grid[row][col]` as coloured cells with their values (× 100) printed; NaN cells blank.
    Heat {
        /// Caption.
        title: String,
        /// X axis (columns) description.
        xlabel: String,
        /// Y axis (rows) description.
        ylabel: String,
        /// The values.
        grid: Vec<Vec<f64>>,
    },
}

/// Logical size; the PNG is drawn at twice it.
const W: u32 = 720;
const H: u32 = 460;
const FONT: &str = "sans-serif";
const COLORS: &[RGBColor] = &[
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0x39, 0x3b, 0x79),
];

/// A line plot of `series`; x on a log scale when `log_x`.
pub fn line_plot(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: Vec<Series>,
    log_x: bool,
) -> Chart {
    Chart::Lines {
        title: title.into(),
        xlabel: xlabel.into(),
        ylabel: ylabel.into(),
        series,
        log_x,
    }
}

/// A heat map of `grid[row][col]` (NaN cells left blank), values printed in the cells.
pub fn heat_map(title: &str, xlabel: &str, ylabel: &str, grid: Vec<Vec<f64>>) -> Chart {
    Chart::Heat {
        title: title.into(),
        xlabel: xlabel.into(),
        ylabel: ylabel.into(),
        grid,
    }
}

/// Registers the embedded font once; plotters lays out text (also for SVG) with it.
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "the embedded DejaVu Sans font does not parse".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Writes a chart as `<stem>.svg` and `<stem>.png` (2 pixels per unit) into `dir`, each atomically.
pub fn write(chart: &Chart, dir: &std::path::Path, stem: &str) -> Result<()> {
    register_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        draw(chart, &root, 1).map_err(|e| anyhow!("drawing {stem}.svg: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("drawing {stem}.svg: {e}"))?;
    }
    let (pw, ph) = (2 * W, 2 * H);
    let mut rgb = vec![0u8; (pw * ph * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (pw, ph)).into_drawing_area();
        draw(chart, &root, 2).map_err(|e| anyhow!("drawing {stem}.png: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("drawing {stem}.png: {e}"))?;
    }
    let png = encode_png(&rgb, pw, ph).with_context(|| format!("encoding {stem}.png"))?;
    for (ext, bytes) in [("svg", svg.into_bytes()), ("png", png)] {
        let path = dir.join(format!("{stem}.{ext}"));
        adapterkit::io::write_atomic(&path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

type Drawn<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Draws `chart` on `root`; `s` scales every size (fonts, margins, strokes) for the PNG.
fn draw<DB: DrawingBackend>(chart: &Chart, root: &DrawingArea<DB, Shift>, s: u32) -> Drawn<DB> {
    root.fill(&WHITE)?;
    match chart {
        Chart::Lines {
            title,
            xlabel,
            ylabel,
            series,
            log_x,
        } => draw_lines(root, s, title, xlabel, ylabel, series, *log_x),
        Chart::Heat {
            title,
            xlabel,
            ylabel,
            grid,
        } => draw_heat(root, s, title, xlabel, ylabel, grid),
    }
}

fn err_of(s: &Series, i: usize) -> f64 {
    s.errors.get(i).copied().unwrap_or(0.0)
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: u32,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    log_x: bool,
) -> Drawn<DB> {
    let font = |size: u32| (FONT, (size * s) as f64);
    let bounds = series.iter().flat_map(|ser| {
        ser.points
            .iter()
            .enumerate()
            .flat_map(move |(i, p)| [(p.0, p.1 - err_of(ser, i)), (p.0, p.1 + err_of(ser, i))])
    });
    let (mut x0, mut x1, mut y0, mut y1) = bounds
        .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_x || p.0 > 0.0))
        .fold(
            (
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ),
            |a, p| (a.0.min(p.0), a.1.max(p.0), a.2.min(p.1), a.3.max(p.1)),
        );
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (1.0, 10.0, 0.0, 1.0);
    }
    if log_x {
        // Whole decades, so that every tick is a power of ten.
        x0 = 10f64.powf(x0.log10().floor());
        x1 = 10f64.powf(x1.log10().ceil()).max(x0 * 10.0);
    } else if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.1).max(0.5);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, font(15))
        .margin(10 * s)
        // Room for the labels of the rightmost points.
        .margin_right(45 * s)
        .x_label_area_size(45 * s)
        .y_label_area_size(60 * s);
    let decade = |x: &f64| {
        let e = x.log10().round() as i32;
        if (0..=4).contains(&e) {
            format!("{}", 10u64.pow(e as u32))
        } else {
            format!("1e{e}")
        }
    };
    let style = |k: usize| COLORS[k % COLORS.len()];
    macro_rules! body {
        ($chart:ident, $xfmt:expr) => {{
            $chart
                .configure_mesh()
                .x_desc(xlabel)
                .y_desc(ylabel)
                .label_style(font(12))
                .axis_desc_style(font(13))
                .x_label_formatter($xfmt)
                .y_label_formatter(&|y: &f64| format!("{}", (y * 100.0).round() / 100.0))
                .max_light_lines(0)
                .draw()?;
            for (k, ser) in series.iter().enumerate() {
                let col = style(k);
                let mut pts: Vec<(f64, f64, &str, f64)> = ser
                    .points
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.0, p.1, p.2.as_str(), err_of(ser, i)))
                    .filter(|p| !log_x || p.0 > 0.0)
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                $chart
                    .draw_series(LineSeries::new(
                        pts.iter().map(|p| (p.0, p.1)),
                        col.stroke_width(2 * s),
                    ))?
                    .label(ser.name.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new(
                            [(x, y - 2 * s as i32), (x + 14 * s as i32, y + 2 * s as i32)],
                            col.filled(),
                        )
                    });
                $chart.draw_series(pts.iter().filter(|p| p.3 > 0.0).map(|p| {
                    ErrorBar::new_vertical(
                        p.0,
                        p.1 - p.3,
                        p.1,
                        p.1 + p.3,
                        col.stroke_width(s),
                        8 * s,
                    )
                }))?;
                $chart.draw_series(pts.iter().map(|p| {
                    EmptyElement::at((p.0, p.1))
                        + Circle::new((0, 0), 4 * s, col.filled())
                        + Text::new(
                            p.2.to_string(),
                            (6 * s as i32, -14 * s as i32),
                            font(10).into_font().color(&col),
                        )
                }))?;
            }
            $chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font(font(12))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    if log_x {
        let mut chart = builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?;
        body!(chart, &decade);
    } else {
        let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;
        body!(chart, &|x: &f64| format!("{x}"));
    }
    Ok(())
}

fn draw_heat<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: u32,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    grid: &[Vec<f64>],
) -> Drawn<DB> {
    let font = |size: u32| (FONT, (size * s) as f64);
    let rows = grid.len().max(1) as i32;
    let cols = grid.iter().map(Vec::len).max().unwrap_or(1).max(1) as i32;
    let vals: Vec<f64> = grid
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (area, legend) = root.split_horizontally((W as i32 - 150) * s as i32);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, font(13))
        .margin(10 * s)
        .x_label_area_size(45 * s)
        .y_label_area_size(50 * s)
        // A segmented `a..b` has a segment for each of a..=b.
        .build_cartesian_2d(
            (0..cols - 1).into_segmented(),
            (0..rows - 1).into_segmented(),
        )?;
    // Row 0 at the top, as the grid is written: drawn row r holds grid row rows - 1 - r. Labels
    // sit at the centres of the cells.
    let centre_label = |v: &SegmentValue<i32>, f: &dyn Fn(i32) -> i32| match v {
        SegmentValue::CenterOf(k) => f(*k).to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(xlabel)
        .y_desc(ylabel)
        .label_style(font(12))
        .axis_desc_style(font(13))
        .x_labels(cols as usize)
        .y_labels(rows as usize)
        .x_label_formatter(&|v| centre_label(v, &|j| j))
        .y_label_formatter(&|v| centre_label(v, &|r| rows - 1 - r))
        .draw()?;
    let shade = |v: f64| {
        let t = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
        // White (low) to dark blue (high).
        let c = RGBColor(
            (255.0 - t * 225.0) as u8,
            (255.0 - t * 175.0) as u8,
            (255.0 - t * 75.0) as u8,
        );
        (c, if t > 0.55 { WHITE } else { BLACK })
    };
    let cells = grid.iter().enumerate().flat_map(|(i, row)| {
        row.iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(move |(j, &v)| (j as i32, rows - 1 - i as i32, v))
    });
    let corners = |j: i32, r: i32| {
        [
            (SegmentValue::Exact(j), SegmentValue::Exact(r + 1)),
            (SegmentValue::Exact(j + 1), SegmentValue::Exact(r)),
        ]
    };
    chart.draw_series(
        cells
            .clone()
            .map(|(j, r, v)| Rectangle::new(corners(j, r), shade(v).0.filled())),
    )?;
    chart.draw_series(
        cells
            .clone()
            .map(|(j, r, _)| Rectangle::new(corners(j, r), WHITE.stroke_width(s))),
    )?;
    let centre = Pos::new(HPos::Center, VPos::Center);
    chart.draw_series(cells.map(|(j, r, v)| {
        Text::new(
            format!("{:.1}", 100.0 * v),
            (SegmentValue::CenterOf(j), SegmentValue::CenterOf(r)),
            font(12).into_font().color(&shade(v).1).pos(centre),
        )
    }))?;
    let t = font(12).into_font().color(&BLACK);
    legend.draw(&Text::new(
        format!("scale: {:.1} (white)", 100.0 * lo),
        (10 * s as i32, 50 * s as i32),
        t.clone(),
    ))?;
    legend.draw(&Text::new(
        format!("... {:.1} (blue)", 100.0 * hi),
        (10 * s as i32, 68 * s as i32),
        t,
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count(px: &[u8], c: RGBColor) -> usize {
        px.chunks(3).filter(|p| p == &[c.0, c.1, c.2]).count()
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ak-chart-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn line_plot_writes_svg_and_png_with_series_in_colour() {
        let dir = tmp("lines");
        let series = vec![
            Series {
                name: "houlsby".into(),
                points: vec![(1e4, 80.0, "m=8".into()), (1e6, 85.0, "m=a<b".into())],
                errors: vec![1.0, 2.0],
            },
            Series {
                name: "head".into(),
                points: vec![(1e3, 70.0, "probe".into())],
                errors: vec![],
            },
        ];
        write(
            &line_plot("T: acc", "params", "acc", series, true),
            &dir,
            "p",
        )
        .unwrap();
        let svg = std::fs::read_to_string(dir.join("p.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("T: acc") && svg.contains("houlsby") && svg.contains("a&lt;b"));
        // Decade ticks of the log axis.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        assert!(texts.contains(&"1000") && texts.contains(&"1e6"), "{svg}");
        let (w, h, px) = decode(&std::fs::read(dir.join("p.png")).unwrap());
        assert_eq!((w, h), (2 * W, 2 * H));
        // Both series' colours are painted (lines, dots, legend), the first one's more.
        let (blue, red) = (count(&px, COLORS[0]), count(&px, COLORS[1]));
        assert!(blue > 500 && red > 50 && blue > red, "{blue} {red}");
        // Text is rendered: dark pixels beyond the frame and the lines.
        assert!(count(&px, BLACK) > 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn heat_map_prints_every_finite_cell_and_leaves_nan_blank() {
        let dir = tmp("heat");
        let grid = vec![vec![0.9, 0.5], vec![f64::NAN, 0.7]];
        write(&heat_map("H", "j", "i", grid), &dir, "h").unwrap();
        let svg = std::fs::read_to_string(dir.join("h.svg")).unwrap();
        for v in ["90.0", "50.0", "70.0", "scale: 50.0"] {
            assert!(svg.contains(v), "{v} missing");
        }
        assert!(!svg.contains("NaN"));
        let (_, _, px) = decode(&std::fs::read(dir.join("h.png")).unwrap());
        // The highest cell is the darkest blue of the scale.
        assert!(count(&px, RGBColor(30, 80, 180)) > 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
