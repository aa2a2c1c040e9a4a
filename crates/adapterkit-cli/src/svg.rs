//! Small self-contained SVG charts for the suite (a line/scatter plot with a log x axis and a heat
//! map). Written by hand: the charts are simple and this keeps font and image dependencies out.

use std::fmt::Write;

/// One labelled series of (x, y, point label) points.
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points; drawn in x order and joined by a line.
    pub points: Vec<(f64, f64, String)>,
}

const W: f64 = 720.0;
const H: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        W / 2.0,
        esc(title)
    )
}

fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut v = Vec::new();
    while t <= hi + 1e-9 {
        v.push(t);
        t += step;
    }
    v
}

/// A line plot; `log_x` puts x on a log10 scale with decade ticks.
pub fn line_plot(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    let fx = |x: f64| if log_x { x.max(1e-30).log10() } else { x };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| (fx(p.0), p.1)))
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = all.iter().fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |a, p| (a.0.min(p.0), a.1.max(p.0), a.2.min(p.1), a.3.max(p.1)),
    );
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if log_x {
        x0 = x0.floor();
        x1 = x1.ceil().max(x0 + 1.0);
    } else if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.1).max(0.5);
    y0 -= pad;
    y1 += pad;
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (fx(x) - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let mut s = header(title);
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>"
    );
    let xticks: Vec<f64> = if log_x {
        (x0 as i32..=x1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        nice_ticks(x0, x1)
    };
    for t in xticks {
        let x = sx(t);
        let label = if log_x {
            let e = t.log10().round() as i32;
            if (0..=6).contains(&e) {
                format!("{}", 10u64.pow(e as u32))
            } else {
                format!("1e{e}")
            }
        } else {
            format!("{t}")
        };
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            TOP + ph,
            TOP + ph + 16.0
        );
    }
    for t in nice_ticks(y0, y1) {
        let y = sy(t);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            (t * 100.0).round() / 100.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        LEFT + pw / 2.0,
        H - 18.0,
        esc(xlabel)
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate(20,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        TOP + ph / 2.0,
        esc(ylabel)
    );
    for (k, ser) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let mut pts = ser.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for p in &pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"{c}\">{}</text>",
                sx(p.0),
                sy(p.1),
                sx(p.0) + 6.0,
                sy(p.1) - 6.0,
                esc(&p.2)
            );
        }
        let ly = TOP + 10.0 + 20.0 * k as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            W - RIGHT + 16.0,
            ly,
            W - RIGHT + 36.0,
            ly + 6.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A heat map of `grid[row][col]` (NaN cells left blank), values printed in the cells.
pub fn heat_map(title: &str, xlabel: &str, ylabel: &str, grid: &[Vec<f64>]) -> String {
    let rows = grid.len().max(1);
    let cols = grid.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let vals: Vec<f64> = grid
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let (cw, ch) = (pw / cols as f64, ph / rows as f64);
    let mut s = header(title);
    for (i, row) in grid.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let t = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
            // White (low) to dark blue (high).
            let (r, g, b) = (
                (255.0 - t * 225.0) as u8,
                (255.0 - t * 175.0) as u8,
                (255.0 - t * 75.0) as u8,
            );
            let (x, y) = (LEFT + j as f64 * cw, TOP + i as f64 * ch);
            let fg = if t > 0.55 { "white" } else { "black" };
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{cw:.1}\" height=\"{ch:.1}\" fill=\"rgb({r},{g},{b})\" stroke=\"white\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{fg}\">{:.1}</text>",
                x + cw / 2.0,
                y + ch / 2.0 + 4.0,
                100.0 * v
            );
        }
    }
    for j in 0..cols {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{j}</text>",
            LEFT + (j as f64 + 0.5) * cw,
            TOP + ph + 16.0
        );
    }
    for i in 0..rows {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{i}</text>",
            LEFT - 6.0,
            TOP + (i as f64 + 0.5) * ch + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text><text transform=\"translate(24,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        LEFT + pw / 2.0,
        H - 18.0,
        esc(xlabel),
        TOP + ph / 2.0,
        esc(ylabel)
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\">scale: {:.1} (white) … {:.1} (blue)</text>",
        W - RIGHT + 10.0,
        TOP + 12.0,
        100.0 * lo,
        100.0 * hi
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_and_place_points() {
        let s = line_plot(
            "t",
            "x",
            "y",
            &[Series {
                name: "a<b".into(),
                points: vec![(10.0, 1.0, "p".into()), (1000.0, 2.0, "q".into())],
            }],
            true,
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("a&lt;b") && s.matches("<circle").count() == 2);
        let h = heat_map("h", "j", "i", &[vec![0.5, 0.7], vec![f64::NAN, 0.9]]);
        assert_eq!(h.matches("<rect x=").count(), 3);
        assert!(h.contains("90.0") && h.contains("50.0"));
    }
}
