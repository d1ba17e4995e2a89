//! Charts of the analyses, as SVG (`.svg`) or PNG (`.png`), with plotters: its SVG backend,
//! and its bitmap backend rasterizing text with `ab_glyph` from a font embedded in swk
//! (Open Sans Regular, Apache-2.0, `data/fonts`), so PNGs need no system font libraries.
//! The same font measures text in both formats.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

/// One bar of a bar chart.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Label under the bar.
    pub label: String,
    /// Height (may be negative).
    pub value: f64,
    /// Colour group (0: blue, 1: red, 2: green, ...).
    pub group: usize,
}

/// One line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points, in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Colour group (same palette as [`Bar::group`]).
    pub group: usize,
    /// Draw thin (for the "edited" counterpart of a line).
    pub thin: bool,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn color(group: usize) -> RGBColor {
    PALETTE[group % PALETTE.len()]
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("plot {}: {e}", path.display()))
}

/// The embedded font (Open Sans Regular, Apache-2.0; see `data/fonts`).
const FONT: &[u8] = include_bytes!("../../data/fonts/OpenSans-Regular.ttf");

/// Register the embedded font as plotters' "sans-serif" (once).
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid("plot: the embedded font could not be read".into()))
    }
}

/// An output format of the charts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Scalable vector graphics.
    Svg,
    /// 8-bit RGB PNG.
    Png,
}

/// The format `path` names by its extension (`.svg` or `.png`).
pub fn format_of(path: &Path) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => Err(Error::Invalid(format!(
            "plot {}: name the file .svg or .png (the formats swk writes)",
            path.display()
        ))),
    }
}

/// Check that `path` names a format swk writes (`.svg` or `.png`).
pub fn check_path(path: &Path) -> Result<()> {
    format_of(path).map(|_| ())
}

/// `path` with the extension `.png` (where `--png` writes the PNG next to an SVG).
pub fn png_sibling(path: &Path) -> PathBuf {
    path.with_extension("png")
}

/// Draw with `draw` on a `size` canvas and write it to `path` in its format.
macro_rules! render {
    ($path:expr, $size:expr, $draw:ident ( $($arg:expr),* )) => {{
        let path: &Path = $path;
        let size: (u32, u32) = $size;
        register_font()?;
        match format_of(path)? {
            Format::Svg => {
                let root = SVGBackend::new(path, size).into_drawing_area();
                $draw(&root, $($arg),*).map_err(|e| plot_err(path, e))?;
                root.present().map_err(|e| plot_err(path, e))
            }
            Format::Png => {
                let mut buf = vec![0u8; size.0 as usize * size.1 as usize * 3];
                {
                    let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
                    $draw(&root, $($arg),*).map_err(|e| plot_err(path, e))?;
                    root.present().map_err(|e| plot_err(path, e))?;
                }
                write_png(path, size, &buf)
            }
        }
    }};
}

/// Encode an RGB buffer as PNG at `path`.
pub fn write_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| plot_err(path, e))?;
    writer.write_image_data(rgb).map_err(|e| plot_err(path, e))?;
    writer.finish().map_err(|e| plot_err(path, e))
}

type Drawn = std::result::Result<(), String>;

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A labelled bar chart, written as SVG or PNG by `path`'s extension.
pub fn bar_chart(path: &Path, title: &str, y_desc: &str, bars: &[Bar]) -> Result<()> {
    check_path(path)?;
    if bars.is_empty() {
        return Err(plot_err(path, "nothing to plot"));
    }
    let width = (120 + 28 * bars.len()).max(640) as u32;
    render!(path, (width, 520), draw_bars(title, y_desc, bars))
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    bars: &[Bar],
) -> Drawn {
    root.fill(&WHITE).map_err(s)?;
    let lo = bars.iter().map(|b| b.value).fold(0.0, f64::min);
    let hi = bars.iter().map(|b| b.value).fold(0.0, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-9);
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(110)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len()).into_segmented(), (lo - pad)..(hi + pad))
        .map_err(s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 12).into_font().transform(FontTransform::Rotate90))
        .y_desc(y_desc)
        .draw()
        .map_err(s)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let (x0, x1) = (SegmentValue::Exact(i), SegmentValue::Exact(i + 1));
            let mut r = Rectangle::new([(x0, 0.0), (x1, b.value)], color(b.group).filled());
            r.set_margin(0, 0, 3, 3);
            r
        }))
        .map_err(s)?;
    Ok(())
}

/// A line chart, written as SVG or PNG by `path`'s extension; `log_y` plots `log10(y)`
/// (points with `y <= 0` are dropped).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    check_path(path)?;
    let tf = |y: f64| if log_y { y.log10() } else { y };
    let pts: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0))
                .map(|&(x, y)| (x, tf(y)))
                .collect()
        })
        .collect();
    if pts.iter().flatten().next().is_none() {
        return Err(plot_err(path, "nothing to plot"));
    }
    let y_desc = if log_y { format!("log10 {y_desc}") } else { y_desc.to_string() };
    render!(path, (900, 540), draw_lines(title, x_desc, &y_desc, series, &pts))
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    pts: &[Vec<(f64, f64)>],
) -> Drawn {
    let all = || pts.iter().flatten();
    let (x0, x1) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let ypad = ((y1 - y0) * 0.05).max(0.1);
    root.fill(&WHITE).map_err(s)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - ypad)..(y1 + ypad))
        .map_err(s)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(s)?;
    for (sr, p) in series.iter().zip(pts) {
        let c = color(sr.group);
        let style = if sr.thin { c.stroke_width(1) } else { c.stroke_width(3) };
        chart
            .draw_series(LineSeries::new(p.iter().copied(), style))
            .map_err(s)?
            .label(sr.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(s)?;
    Ok(())
}
