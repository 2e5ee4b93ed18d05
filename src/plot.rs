//! Figures with plotters: line charts (loss, accuracy vs step) and bar charts (final accuracy
//! with ± std). A [`Figure`] shows inline in evcxr as `image/svg+xml` and saves `.svg` or `.png`.
//! PNG text is drawn with an embedded DejaVu Sans, so it works on a machine without fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// One colour per series index (colour-blind-safe Okabe–Ito order).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

fn font_ready() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
        // The bytes are a valid TrueType font, checked by the plot tests.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The corner of a line chart with the fewest data points under it (upper right when that one is
/// free), so the legend box hides as little of the lines as it can.
fn legend_corner(points: &[(f64, f64)], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    let frac = |v: f64, (a, b): (f64, f64)| if b > a { (v - a) / (b - a) } else { 0.5 };
    let count = |right: bool, upper: bool| {
        points
            .iter()
            .filter(|&&(px, py)| {
                let (fx, fy) = (frac(px, x), frac(py, y));
                (if right { fx > 0.5 } else { fx < 0.5 })
                    && (if upper { fy > 0.7 } else { fy < 0.3 })
            })
            .count()
    };
    [
        (SeriesLabelPosition::UpperRight, count(true, true)),
        (SeriesLabelPosition::UpperLeft, count(false, true)),
        (SeriesLabelPosition::LowerRight, count(true, false)),
        (SeriesLabelPosition::LowerLeft, count(false, false)),
    ]
    .into_iter()
    .min_by_key(|(_, n)| *n)
    .map(|(p, _)| p)
    .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// The legend box (upper right unless told otherwise), shared by the line and bar charts.
fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(position)
        .draw()
        .map_err(plot_err)
}

/// A line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Colour index into the palette (one per optimizer).
    pub color: usize,
    /// Dashed line (e.g. the mismatched split).
    pub dashed: bool,
    /// Thin and light (e.g. raw loss under its smoothed curve).
    pub faint: bool,
}

/// A bar of a bar chart: a group (x label), a name (legend), value and ± error.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Group on the x axis, e.g. the eval split.
    pub group: String,
    /// Legend label, e.g. the optimizer.
    pub name: String,
    /// Bar height.
    pub value: f64,
    /// Half-length of the error bar (0 for none).
    pub err: f64,
    /// Colour index.
    pub color: usize,
}

#[derive(Debug, Clone)]
enum Content {
    Lines(Vec<Series>),
    Bars(Vec<Bar>),
    Heatmap(Vec<Vec<f64>>),
}

/// A chart: title, axis labels and its data, rendered on demand to SVG or PNG.
///
/// ```
/// use mfac_lab::plot::{Figure, Series};
/// let fig = Figure::lines("loss", "step", "loss", vec![Series {
///     name: "adamw".into(), points: vec![(1.0, 1.1), (2.0, 0.9)], color: 0, dashed: false, faint: false,
/// }]);
/// assert!(fig.to_svg()?.contains("adamw"));
/// # Ok::<(), mfac_lab::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Figure {
    /// Title above the chart.
    pub title: String,
    /// x-axis label.
    pub x_label: String,
    /// y-axis label.
    pub y_label: String,
    /// Pixel size (width, height).
    pub size: (u32, u32),
    content: Content,
}

/// The largest figure drawn: 16384 pixels a side and 64 million pixels (a 192 MB bitmap).
const MAX_SIDE: u32 = 16384;
const MAX_PIXELS: u64 = 64 << 20;

impl Figure {
    /// Checks the pixel size before drawing: both sides at least 16 and at most 16384 pixels,
    /// at most 64 million pixels in all.
    fn check_size(&self) -> Result<()> {
        let (w, h) = self.size;
        if !(16..=MAX_SIDE).contains(&w)
            || !(16..=MAX_SIDE).contains(&h)
            || w as u64 * h as u64 > MAX_PIXELS
        {
            return Err(Error::InvalidArgument(format!(
                "figure size {w}×{h}: each side must be 16 to {MAX_SIDE} pixels and the area at most {MAX_PIXELS} pixels (e.g. size = (900, 520))"
            )));
        }
        Ok(())
    }
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("plotting failed: {e}"))
}

impl Figure {
    /// A line chart.
    pub fn lines(title: &str, x_label: &str, y_label: &str, series: Vec<Series>) -> Self {
        Figure {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            size: (800, 480),
            content: Content::Lines(series),
        }
    }

    /// A grouped bar chart with error bars.
    pub fn bars(title: &str, y_label: &str, bars: Vec<Bar>) -> Self {
        Figure {
            title: title.into(),
            x_label: String::new(),
            y_label: y_label.into(),
            size: (800, 480),
            content: Content::Bars(bars),
        }
    }

    /// A heatmap of a matrix (row 0 at the top), diverging colours around 0 (blue < 0 < red),
    /// scaled by the largest magnitude.
    pub fn heatmap(title: &str, x_label: &str, y_label: &str, matrix: Vec<Vec<f64>>) -> Self {
        Figure {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            size: (560, 520),
            content: Content::Heatmap(matrix),
        }
    }

    /// The series (line charts) or bar names, for checks.
    pub fn names(&self) -> Vec<String> {
        match &self.content {
            Content::Lines(s) => s.iter().map(|s| s.name.clone()).collect(),
            Content::Bars(b) => b.iter().map(|b| b.name.clone()).collect(),
            Content::Heatmap(_) => vec![],
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        font_ready();
        root.fill(&WHITE).map_err(plot_err)?;
        match &self.content {
            Content::Lines(series) => self.draw_lines(&root, series)?,
            Content::Bars(bars) => self.draw_bars(&root, bars)?,
            Content::Heatmap(m) => self.draw_heatmap(&root, m)?,
        }
        root.present().map_err(plot_err)
    }

    fn draw_lines<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        series: &[Series],
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let pts = series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-9);
        let xr = if x1 > x0 { x0..x1 } else { x0 - 0.5..x1 + 0.5 };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(xr, (y0 - pad)..(y1 + pad))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        for s in series {
            let c = PALETTE[s.color % PALETTE.len()];
            let style = if s.faint {
                c.mix(0.3).stroke_width(1)
            } else {
                c.stroke_width(2)
            };
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            let anno = if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))
                    .map_err(plot_err)?
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(plot_err)?
            };
            if !s.faint {
                anno.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            }
            if pts.len() <= 12 && !s.faint {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(plot_err)?;
            }
        }
        let all: Vec<(f64, f64)> = series
            .iter()
            .filter(|s| !s.faint)
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        draw_legend(
            &mut chart,
            legend_corner(&all, (x0, x1), (y0 - pad, y1 + pad)),
        )
    }

    fn draw_bars<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        bars: &[Bar],
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let mut groups: Vec<String> = vec![];
        let mut names: Vec<(String, usize)> = vec![];
        for b in bars {
            if !groups.contains(&b.group) {
                groups.push(b.group.clone());
            }
            if !names.iter().any(|(n, _)| *n == b.name) {
                names.push((b.name.clone(), b.color));
            }
        }
        let top = bars
            .iter()
            .map(|b| b.value + b.err)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            * if names.len() > 2 { 1.6 } else { 1.15 };
        let width = 1.0 / (names.len() as f64 + 1.0);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top.max(1e-9))
            .map_err(plot_err)?;
        let g2 = groups.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 && i < g2.len() {
                    g2[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        for (k, (name, color)) in names.iter().enumerate() {
            let c = PALETTE[color % PALETTE.len()];
            let mine: Vec<&Bar> = bars.iter().filter(|b| &b.name == name).collect();
            let rects = mine.iter().map(|b| {
                let g = groups.iter().position(|x| *x == b.group).unwrap_or(0) as f64;
                let x = g + width * (k as f64 + 0.5);
                Rectangle::new([(x, 0.0), (x + width * 0.9, b.value)], c.filled())
            });
            chart
                .draw_series(rects)
                .map_err(plot_err)?
                .label(name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
            let errs = mine.iter().filter(|b| b.err > 0.0).map(|b| {
                let g = groups.iter().position(|x| *x == b.group).unwrap_or(0) as f64;
                let x = g + width * (k as f64 + 0.95);
                ErrorBar::new_vertical(x, b.value - b.err, b.value, b.value + b.err, BLACK, 8)
            });
            chart.draw_series(errs).map_err(plot_err)?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
    }

    fn draw_heatmap<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        m: &[Vec<f64>],
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let rows = m.len();
        let cols = m.iter().map(Vec::len).max().unwrap_or(0);
        let scale = m
            .iter()
            .flatten()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, v| a.max(v.abs()))
            .max(1e-300);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..cols.max(1) as f64, rows.max(1) as f64..0.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        let cells = m.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, &v)| {
                let t = if v.is_finite() {
                    (v / scale).clamp(-1.0, 1.0)
                } else {
                    0.0
                };
                let fade = |c: f64| (255.0 * (1.0 - t.abs()) + c * t.abs()) as u8;
                let color = if t >= 0.0 {
                    RGBColor(fade(213.0), fade(94.0), fade(0.0))
                } else {
                    RGBColor(fade(0.0), fade(114.0), fade(178.0))
                };
                Rectangle::new(
                    [(j as f64, i as f64), (j as f64 + 1.0, i as f64 + 1.0)],
                    color.filled(),
                )
            })
        });
        chart.draw_series(cells).map_err(plot_err)?;
        Ok(())
    }

    /// The figure as an SVG document.
    pub fn to_svg(&self) -> Result<String> {
        self.check_size()?;
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, self.size).into_drawing_area();
            self.draw(root)?;
        }
        Ok(s)
    }

    /// The figure as PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        self.check_size()?;
        let (w, h) = self.size;
        let mut rgb = vec![0u8; w as usize * h as usize * 3];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            self.draw(root)?;
        }
        let img = image::RgbImage::from_raw(w, h, rgb)
            .ok_or_else(|| plot_err("image buffer of the wrong size"))?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(plot_err)?;
        Ok(out.into_inner())
    }

    /// Saves as `.svg` or `.png` (by extension), atomically (temporary file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = match path.extension().and_then(|e| e.to_str()) {
            Some("svg") => self.to_svg()?.into_bytes(),
            Some("png") => self.to_png()?,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{}: save a figure as .svg or .png",
                    path.display()
                )))
            }
        };
        crate::io::write_bytes_atomic(path, &bytes)
    }

    /// What [`Figure::evcxr_display`] prints: the SVG in evcxr's `image/svg+xml` content block.
    pub fn evcxr_block(&self) -> Result<String> {
        Ok(format!(
            "EVCXR_BEGIN_CONTENT image/svg+xml\n{}\nEVCXR_END_CONTENT",
            self.to_svg()?.trim()
        ))
    }

    /// Shows the figure inline in an evcxr notebook (as `image/svg+xml`).
    pub fn evcxr_display(&self) {
        match self.evcxr_block() {
            Ok(block) => println!("{block}"),
            Err(e) => println!("{e}"),
        }
    }
}

/// Exponential moving average with `alpha` (TensorBoard-style smoothing of a loss curve).
pub fn smooth(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut acc: Option<f64> = None;
    for &(x, y) in points {
        let v = match acc {
            Some(a) => alpha * a + (1.0 - alpha) * y,
            None => y,
        };
        acc = Some(v);
        out.push((x, v));
    }
    out
}
