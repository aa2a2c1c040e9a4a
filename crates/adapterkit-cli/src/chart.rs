//! Small self-contained charts for the suite (a line/scatter plot with a log x axis and a heat
//! map), drawn once as a list of shapes and written both as SVG and as PNG. The PNG side is a
//! tiny rasterizer with the public-domain 8×8 bitmap font from `font8x8`, so no system fonts, font
//! files or image libraries are needed; the charts are simple enough for that.

use std::fmt::Write;

/// One labelled series of (x, y, point label) points.
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points; drawn in x order and joined by a line.
    pub points: Vec<(f64, f64, String)>,
    /// Half-heights of error bars, one per point in `points`' order; empty for none.
    pub errors: Vec<f64>,
}

/// An RGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

/// Where a text's x coordinate sits on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// x is the text's left end.
    Start,
    /// x is the text's centre.
    Middle,
    /// x is the text's right end.
    End,
}

/// One drawing primitive, in the chart's logical coordinates (y down, baseline-anchored text).
#[derive(Debug, Clone)]
pub enum Shape {
    /// An axis-aligned rectangle, filled and/or outlined (1 unit).
    Rect {
        /// Left, top, width, height.
        xywh: [f64; 4],
        /// Fill colour, if filled.
        fill: Option<Rgb>,
        /// Outline colour, if outlined.
        stroke: Option<Rgb>,
    },
    /// A polyline of the given width (two points make a line).
    Line {
        /// Vertices.
        pts: Vec<(f64, f64)>,
        /// Colour.
        color: Rgb,
        /// Stroke width.
        width: f64,
    },
    /// A filled disc.
    Dot {
        /// Centre.
        c: (f64, f64),
        /// Radius.
        r: f64,
        /// Colour.
        color: Rgb,
    },
    /// A line of text.
    Text(Label),
}

/// A line of text; `vertical` turns it 90° counter-clockwise about its anchor point.
#[derive(Debug, Clone)]
pub struct Label {
    /// Anchor point (x per `anchor`, y on the baseline).
    pub at: (f64, f64),
    /// The text.
    pub text: String,
    /// Font size.
    pub size: f64,
    /// Horizontal anchoring.
    pub anchor: Anchor,
    /// Colour.
    pub color: Rgb,
    /// Rotated to run bottom to top.
    pub vertical: bool,
}

/// A drawn chart: its size and shapes, rendered by [`Chart::to_svg`] and [`Chart::to_png`].
#[derive(Debug, Clone)]
pub struct Chart {
    /// Logical width.
    pub width: f64,
    /// Logical height.
    pub height: f64,
    /// Shapes in painting order.
    pub shapes: Vec<Shape>,
}

const W: f64 = 720.0;
const H: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const BLACK: Rgb = Rgb(0, 0, 0);
const WHITE: Rgb = Rgb(255, 255, 255);
const GRID: Rgb = Rgb(0xdd, 0xdd, 0xdd);
const FRAME: Rgb = Rgb(0x33, 0x33, 0x33);
const COLORS: &[Rgb] = &[
    Rgb(0x1f, 0x77, 0xb4),
    Rgb(0xd6, 0x27, 0x28),
    Rgb(0x2c, 0xa0, 0x2c),
    Rgb(0x94, 0x67, 0xbd),
    Rgb(0xff, 0x7f, 0x0e),
    Rgb(0x8c, 0x56, 0x4b),
];

impl Chart {
    fn new(title: &str) -> Chart {
        let mut c = Chart {
            width: W,
            height: H,
            shapes: vec![Shape::Rect {
                xywh: [0.0, 0.0, W, H],
                fill: Some(WHITE),
                stroke: None,
            }],
        };
        c.text((W / 2.0, 24.0), title, 14.0, Anchor::Middle, BLACK);
        c
    }

    fn text(&mut self, at: (f64, f64), text: &str, size: f64, anchor: Anchor, color: Rgb) {
        self.shapes.push(Shape::Text(Label {
            at,
            text: text.to_string(),
            size,
            anchor,
            color,
            vertical: false,
        }));
    }

    /// The x label under the plot area and the y label turned along its left side at `yx`.
    fn axis_labels(&mut self, xlabel: &str, ylabel: &str, yx: f64) {
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        self.text(
            (LEFT + pw / 2.0, H - 18.0),
            xlabel,
            12.0,
            Anchor::Middle,
            BLACK,
        );
        self.shapes.push(Shape::Text(Label {
            at: (yx, TOP + ph / 2.0),
            text: ylabel.to_string(),
            size: 12.0,
            anchor: Anchor::Middle,
            color: BLACK,
            vertical: true,
        }));
    }

    fn line(&mut self, a: (f64, f64), b: (f64, f64), color: Rgb) {
        self.shapes.push(Shape::Line {
            pts: vec![a, b],
            color,
            width: 1.0,
        });
    }

    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let hex = |c: Rgb| format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n",
            w = self.width,
            h = self.height
        );
        for sh in &self.shapes {
            let _ = match sh {
                Shape::Rect { xywh, fill, stroke } => writeln!(
                    s,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" stroke=\"{}\"/>",
                    xywh[0],
                    xywh[1],
                    xywh[2],
                    xywh[3],
                    fill.map_or("none".into(), hex),
                    stroke.map_or("none".into(), hex)
                ),
                Shape::Line { pts, color, width } => {
                    let p: Vec<String> =
                        pts.iter().map(|p| format!("{:.1},{:.1}", p.0, p.1)).collect();
                    writeln!(
                        s,
                        "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\"/>",
                        p.join(" "),
                        hex(*color)
                    )
                }
                Shape::Dot { c, r, color } => writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{r}\" fill=\"{}\"/>",
                    c.0,
                    c.1,
                    hex(*color)
                ),
                Shape::Text(l) => {
                    let a = match l.anchor {
                        Anchor::Start => "start",
                        Anchor::Middle => "middle",
                        Anchor::End => "end",
                    };
                    let place = if l.vertical {
                        format!(
                            "transform=\"translate({:.1},{:.1}) rotate(-90)\"",
                            l.at.0, l.at.1
                        )
                    } else {
                        format!("x=\"{:.1}\" y=\"{:.1}\"", l.at.0, l.at.1)
                    };
                    writeln!(
                        s,
                        "<text {place} text-anchor=\"{a}\" font-size=\"{}\" fill=\"{}\">{}</text>",
                        l.size,
                        hex(l.color),
                        esc(&l.text)
                    )
                }
            };
        }
        s.push_str("</svg>\n");
        s
    }

    /// The chart as a PNG (8-bit RGB) at `res` pixels per logical unit.
    pub fn to_png(&self, res: u32) -> Vec<u8> {
        let mut r = Raster::new(
            (self.width * res as f64).round() as usize,
            (self.height * res as f64).round() as usize,
            res as f64,
        );
        for sh in &self.shapes {
            r.draw(sh);
        }
        r.encode_png()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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
pub fn line_plot(title: &str, xlabel: &str, ylabel: &str, series: &[Series], log_x: bool) -> Chart {
    let fx = |x: f64| if log_x { x.max(1e-30).log10() } else { x };
    let err = |s: &Series, i: usize| s.errors.get(i).copied().unwrap_or(0.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .enumerate()
                .flat_map(move |(i, p)| [(fx(p.0), p.1 - err(s, i)), (fx(p.0), p.1 + err(s, i))])
        })
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
    let mut c = Chart::new(title);
    let xticks: Vec<f64> = if log_x {
        (x0 as i32..=x1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        nice_ticks(x0, x1)
    };
    for t in xticks {
        let x = sx(t);
        let label = if log_x {
            let e = t.log10().round() as i32;
            if (0..=4).contains(&e) {
                format!("{}", 10u64.pow(e as u32))
            } else {
                format!("1e{e}")
            }
        } else {
            format!("{t}")
        };
        c.line((x, TOP), (x, TOP + ph), GRID);
        c.text((x, TOP + ph + 16.0), &label, 12.0, Anchor::Middle, BLACK);
    }
    for t in nice_ticks(y0, y1) {
        let y = sy(t);
        c.line((LEFT, y), (LEFT + pw, y), GRID);
        let label = format!("{}", (t * 100.0).round() / 100.0);
        c.text((LEFT - 6.0, y + 4.0), &label, 12.0, Anchor::End, BLACK);
    }
    c.shapes.push(Shape::Rect {
        xywh: [LEFT, TOP, pw, ph],
        fill: None,
        stroke: Some(FRAME),
    });
    c.axis_labels(xlabel, ylabel, 20.0);
    // Point labels go to the first of four corners around their point that overlaps no label
    // placed before (boxes estimated at 6.5 units per character of the 10-unit font).
    let mut placed: Vec<[f64; 4]> = Vec::new();
    let mut place_label = |x: f64, y: f64, label: &str| -> (f64, f64, Anchor) {
        let (w, h) = (6.5 * label.chars().count() as f64, 10.0);
        let options = [
            (x + 6.0, y - 6.0, Anchor::Start, x + 6.0),
            (x + 6.0, y + 15.0, Anchor::Start, x + 6.0),
            (x - 6.0, y - 6.0, Anchor::End, x - 6.0 - w),
            (x - 6.0, y + 15.0, Anchor::End, x - 6.0 - w),
        ];
        let free = |b: &[f64; 4]| {
            placed
                .iter()
                .all(|o| b[0] >= o[2] || o[0] >= b[2] || b[1] >= o[3] || o[1] >= b[3])
        };
        let pick = options
            .iter()
            .find(|o| free(&[o.3, o.1 - h, o.3 + w, o.1]))
            .unwrap_or(&options[0]);
        placed.push([pick.3, pick.1 - h, pick.3 + w, pick.1]);
        (pick.0, pick.1, pick.2)
    };
    for (k, ser) in series.iter().enumerate() {
        let col = COLORS[k % COLORS.len()];
        let mut pts: Vec<(f64, f64, String, f64)> = ser
            .points
            .iter()
            .enumerate()
            .map(|(i, p)| (p.0, p.1, p.2.clone(), err(ser, i)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        c.shapes.push(Shape::Line {
            pts: pts.iter().map(|p| (sx(p.0), sy(p.1))).collect(),
            color: col,
            width: 2.0,
        });
        for p in &pts {
            let (x, y) = (sx(p.0), sy(p.1));
            if p.3 > 0.0 {
                let (lo, hi) = (sy(p.1 - p.3), sy(p.1 + p.3));
                for pts in [
                    vec![(x, lo), (x, hi)],
                    vec![(x - 4.0, lo), (x + 4.0, lo)],
                    vec![(x - 4.0, hi), (x + 4.0, hi)],
                ] {
                    c.shapes.push(Shape::Line {
                        pts,
                        color: col,
                        width: 1.0,
                    });
                }
            }
            c.shapes.push(Shape::Dot {
                c: (x, y),
                r: 4.0,
                color: col,
            });
            let (lx, ly, anchor) = place_label(x, y, &p.2);
            c.text((lx, ly), &p.2, 10.0, anchor, col);
        }
        let ly = TOP + 10.0 + 20.0 * k as f64;
        c.shapes.push(Shape::Rect {
            xywh: [W - RIGHT + 16.0, ly, 14.0, 4.0],
            fill: Some(col),
            stroke: None,
        });
        c.text(
            (W - RIGHT + 36.0, ly + 6.0),
            &ser.name,
            12.0,
            Anchor::Start,
            BLACK,
        );
    }
    c
}

/// A heat map of `grid[row][col]` (NaN cells left blank), values printed in the cells.
pub fn heat_map(title: &str, xlabel: &str, ylabel: &str, grid: &[Vec<f64>]) -> Chart {
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
    let mut c = Chart::new(title);
    for (i, row) in grid.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let t = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
            // White (low) to dark blue (high).
            let fill = Rgb(
                (255.0 - t * 225.0) as u8,
                (255.0 - t * 175.0) as u8,
                (255.0 - t * 75.0) as u8,
            );
            let (x, y) = (LEFT + j as f64 * cw, TOP + i as f64 * ch);
            c.shapes.push(Shape::Rect {
                xywh: [x, y, cw, ch],
                fill: Some(fill),
                stroke: Some(WHITE),
            });
            let fg = if t > 0.55 { WHITE } else { BLACK };
            c.text(
                (x + cw / 2.0, y + ch / 2.0 + 4.0),
                &format!("{:.1}", 100.0 * v),
                12.0,
                Anchor::Middle,
                fg,
            );
        }
    }
    for j in 0..cols {
        c.text(
            (LEFT + (j as f64 + 0.5) * cw, TOP + ph + 16.0),
            &j.to_string(),
            12.0,
            Anchor::Middle,
            BLACK,
        );
    }
    for i in 0..rows {
        c.text(
            (LEFT - 6.0, TOP + (i as f64 + 0.5) * ch + 4.0),
            &i.to_string(),
            12.0,
            Anchor::End,
            BLACK,
        );
    }
    c.axis_labels(xlabel, ylabel, 24.0);
    c.text(
        (W - RIGHT + 10.0, TOP + 12.0),
        &format!("scale: {:.1} (white)", 100.0 * lo),
        12.0,
        Anchor::Start,
        BLACK,
    );
    c.text(
        (W - RIGHT + 10.0, TOP + 28.0),
        &format!("... {:.1} (blue)", 100.0 * hi),
        12.0,
        Anchor::Start,
        BLACK,
    );
    c
}

/// An RGB pixel buffer that shapes are painted into.
struct Raster {
    w: usize,
    h: usize,
    res: f64,
    px: Vec<u8>,
}

/// The 8×8 glyph of a character; characters outside Basic Latin and Latin-1 map to close ASCII
/// stand-ins (the charts' minus sign, dashes and ellipsis) or to '?'.
fn glyph(ch: char) -> [u8; 8] {
    let c = match ch {
        '−' | '–' | '—' => '-',
        // Three one-pixel dots on the baseline.
        '…' => return [0, 0, 0, 0, 0, 0b0100_1001, 0b0100_1001, 0],
        c => c,
    };
    let u = c as u32;
    if u < 128 {
        font8x8::legacy::BASIC_LEGACY[u as usize]
    } else if (0xA0..0x100).contains(&u) {
        font8x8::legacy::LATIN_LEGACY[(u - 0xA0) as usize]
    } else {
        font8x8::legacy::BASIC_LEGACY[b'?' as usize]
    }
}

/// Columns a glyph occupies (first set column, width); spaces get a fixed 4-column advance.
fn glyph_span(g: &[u8; 8]) -> (u32, u32) {
    let bits = g.iter().fold(0u8, |a, r| a | r);
    if bits == 0 {
        return (0, 3);
    }
    let first = bits.trailing_zeros();
    let last = 7 - bits.leading_zeros();
    (first, last - first + 1)
}

impl Raster {
    fn new(w: usize, h: usize, res: f64) -> Raster {
        Raster {
            w,
            h,
            res,
            px: vec![255; w * h * 3],
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&[c.0, c.1, c.2]);
        }
    }

    /// Fills device pixels whose centres lie in [x0, x1) × [y0, y1) (device units).
    fn fill(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb) {
        let (ax, bx) = ((x0 - 0.5).ceil() as i64, (x1 - 0.5).ceil() as i64);
        let (ay, by) = ((y0 - 0.5).ceil() as i64, (y1 - 0.5).ceil() as i64);
        for y in ay..by {
            for x in ax..bx {
                self.put(x, y, c);
            }
        }
    }

    fn disc(&mut self, cx: f64, cy: f64, r: f64, c: Rgb) {
        let (ax, bx) = ((cx - r).floor() as i64, (cx + r).ceil() as i64);
        let (ay, by) = ((cy - r).floor() as i64, (cy + r).ceil() as i64);
        for y in ay..=by {
            for x in ax..=bx {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                if dx * dx + dy * dy <= r * r {
                    self.put(x, y, c);
                }
            }
        }
    }

    fn segment(&mut self, a: (f64, f64), b: (f64, f64), width: f64, c: Rgb) {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let steps = (dx.abs().max(dy.abs()) * 2.0).ceil().max(1.0) as usize;
        let half = (width / 2.0).max(0.5);
        for k in 0..=steps {
            let t = k as f64 / steps as f64;
            let (x, y) = (a.0 + t * dx, a.1 + t * dy);
            self.fill(x - half, y - half, x + half, y + half, c);
        }
    }

    fn draw(&mut self, sh: &Shape) {
        let s = self.res;
        match sh {
            Shape::Rect { xywh, fill, stroke } => {
                let [x, y, w, h] = xywh.map(|v| v * s);
                if let Some(f) = fill {
                    self.fill(x, y, x + w, y + h, *f);
                }
                if let Some(st) = stroke {
                    for (a, b) in [
                        ((x, y), (x + w, y)),
                        ((x + w, y), (x + w, y + h)),
                        ((x + w, y + h), (x, y + h)),
                        ((x, y + h), (x, y)),
                    ] {
                        self.segment(a, b, s, *st);
                    }
                }
            }
            Shape::Line { pts, color, width } => {
                for w in pts.windows(2) {
                    let a = (w[0].0 * s, w[0].1 * s);
                    let b = (w[1].0 * s, w[1].1 * s);
                    self.segment(a, b, width * s, *color);
                }
            }
            Shape::Dot { c, r, color } => self.disc(c.0 * s, c.1 * s, r * s, *color),
            Shape::Text(l) => self.text(l),
        }
    }

    /// Draws text with font pixels of `size·res/12` device pixels (the 8×8 font's cap height of
    /// 7 rows then comes out near a sans-serif font's), glyphs packed by their inked columns.
    fn text(&mut self, l: &Label) {
        let (x, y, c, vertical) = (l.at.0 * self.res, l.at.1 * self.res, l.color, l.vertical);
        let fp = (l.size * self.res / 12.0).round().max(1.0) as i64;
        let glyphs: Vec<([u8; 8], (u32, u32))> = l
            .text
            .chars()
            .map(|ch| {
                let g = glyph(ch);
                (g, glyph_span(&g))
            })
            .collect();
        let cols: i64 = glyphs.iter().map(|(_, (_, w))| *w as i64 + 1).sum::<i64>() - 1;
        let len = cols.max(0) * fp;
        let start = match l.anchor {
            Anchor::Start => 0,
            Anchor::Middle => -len / 2,
            Anchor::End => -len,
        };
        let (x0, y0) = (x.round() as i64, y.round() as i64);
        let mut pen = start;
        for (g, (first, width)) in glyphs {
            for (r, row) in g.iter().enumerate() {
                for col in 0..8u32 {
                    if row >> col & 1 == 0 {
                        continue;
                    }
                    // Local coordinates: along the text, and down from the baseline (row 7 is
                    // the descender row, so the baseline sits under row 6).
                    let lx = pen + (col as i64 - first as i64) * fp;
                    let ly = (r as i64 - 7) * fp;
                    for dy in 0..fp {
                        for dx in 0..fp {
                            let (u, v) = (lx + dx, ly + dy);
                            if vertical {
                                // rotate(-90): (u, v) -> (v, -u).
                                self.put(x0 + v, y0 - u, c);
                            } else {
                                self.put(x0 + u, y0 + v, c);
                            }
                        }
                    }
                }
            }
            pen += (width as i64 + 1) * fp;
        }
    }

    fn encode_png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.h * (1 + self.w * 3));
        for row in self.px.chunks(self.w * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter set, no interlace
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(
            &mut out,
            b"IDAT",
            &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 9),
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

/// Writes a chart as `<stem>.svg` and `<stem>.png` (2 pixels per unit) into `dir`, each atomically.
pub fn write(chart: &Chart, dir: &std::path::Path, stem: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    for (ext, bytes) in [
        ("svg", chart.to_svg().into_bytes()),
        ("png", chart.to_png(2)),
    ] {
        let path = dir.join(format!("{stem}.{ext}"));
        adapterkit::io::write_atomic(&path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a PNG written by `encode_png`: checks the signature and every chunk's CRC, and
    /// returns (width, height, RGB pixels).
    fn decode(png: &[u8]) -> (usize, usize, Vec<u8>) {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (mut i, mut w, mut h, mut idat) = (8, 0, 0, Vec::new());
        while i < png.len() {
            let n = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
            let kind = &png[i + 4..i + 8];
            let data = &png[i + 8..i + 8 + n];
            let crc = u32::from_be_bytes(png[i + 8 + n..i + 12 + n].try_into().unwrap());
            let mut hs = crc32fast::Hasher::new();
            hs.update(kind);
            hs.update(data);
            assert_eq!(hs.finalize(), crc, "chunk CRC");
            match kind {
                b"IHDR" => {
                    w = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                    h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                    assert_eq!(&data[8..], &[8, 2, 0, 0, 0]);
                }
                b"IDAT" => idat.extend_from_slice(data),
                _ => {}
            }
            i += 12 + n;
        }
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&idat).unwrap();
        assert_eq!(raw.len(), h * (1 + 3 * w));
        let px: Vec<u8> = raw
            .chunks(1 + 3 * w)
            .flat_map(|r| {
                assert_eq!(r[0], 0);
                r[1..].to_vec()
            })
            .collect();
        (w, h, px)
    }

    fn at(px: &[u8], w: usize, x: usize, y: usize) -> Rgb {
        let i = (y * w + x) * 3;
        Rgb(px[i], px[i + 1], px[i + 2])
    }

    #[test]
    fn charts_are_well_formed_and_place_points() {
        let plot = |errors: Vec<f64>| {
            line_plot(
                "t",
                "x",
                "y",
                &[Series {
                    name: "a<b".into(),
                    points: vec![(10.0, 1.0, "p".into()), (1000.0, 2.0, "q".into())],
                    errors,
                }],
                true,
            )
            .to_svg()
        };
        let s = plot(vec![0.5, 0.0]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("a&lt;b") && s.matches("<circle").count() == 2);
        // One error bar (a stem and two caps) for the first point only.
        let bars = |s: &str| s.matches("stroke=\"#1f77b4\" stroke-width=\"1\"").count();
        assert_eq!((bars(&s), bars(&plot(Vec::new()))), (3, 0));
        let h = heat_map("h", "j", "i", &[vec![0.5, 0.7], vec![f64::NAN, 0.9]]).to_svg();
        // Background plus three cells.
        assert_eq!(h.matches("<rect x=").count(), 4);
        assert!(h.contains("90.0") && h.contains("50.0"));
    }

    #[test]
    fn png_decodes_and_shows_the_shapes() {
        let grid = vec![vec![0.5, 0.7], vec![f64::NAN, 0.9]];
        let chart = heat_map("title", "j", "i", &grid);
        let (w, h, px) = decode(&chart.to_png(2));
        assert_eq!((w, h), (1440, 920));
        // Cell (1, 1) holds the maximum: dark blue. Sample near its top-left corner, away from
        // its printed value.
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let (x, y) = (LEFT + pw / 2.0 + 6.0, TOP + ph / 2.0 + 6.0);
        assert_eq!(at(&px, w, 2 * x as usize, 2 * y as usize), Rgb(30, 80, 180));
        // The NaN cell stays white.
        let (x, y) = (LEFT + 6.0, TOP + ph / 2.0 + 6.0);
        assert_eq!(at(&px, w, 2 * x as usize, 2 * y as usize), WHITE);
        // The title is inked in black around its anchor, and nowhere above the glyphs' top.
        let inked = |x0: usize, x1: usize, y0: usize, y1: usize| {
            (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| at(&px, w, x, y) == BLACK)
                .count()
        };
        assert!(inked(690, 750, 30, 48) > 20);
        assert_eq!(inked(0, w, 0, 20), 0);
        // The vertical y label runs along x ≈ 24 (device 48), ink only to its left.
        let mid = (2.0 * (TOP + ph / 2.0)) as usize;
        assert!(inked(30, 48, mid - 10, mid + 10) > 0);
        assert_eq!(inked(49, 60, mid - 10, mid + 10), 0);
    }

    #[test]
    fn line_plot_png_draws_series_in_colour() {
        let chart = line_plot(
            "t",
            "x",
            "y",
            &[Series {
                name: "s".into(),
                points: vec![(10.0, 1.0, "p".into()), (1000.0, 2.0, "q".into())],
                errors: Vec::new(),
            }],
            true,
        );
        let (w, _, px) = decode(&chart.to_png(1));
        let blue = px
            .chunks(3)
            .filter(|p| Rgb(p[0], p[1], p[2]) == COLORS[0])
            .count();
        // Two discs of radius 4 and a 2-wide line across the plot at least.
        assert!(blue > 2 * 40 + 2 * 300, "{blue} coloured pixels");
        assert_eq!(w, 720);
    }
}
