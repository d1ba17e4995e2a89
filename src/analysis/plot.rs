//! SVG charts of the analyses (plotters' SVG backend: pure Rust, text left to the viewer's
//! fonts). Only `.svg` paths are accepted: bitmap output would need a font rasterizer and
//! system font libraries.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
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

/// Check that `path` names an SVG file.
pub fn check_svg(path: &Path) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(()),
        _ => Err(Error::Invalid(format!(
            "plot {}: only SVG output is supported (name the file .svg)",
            path.display()
        ))),
    }
}

/// A labelled bar chart.
pub fn bar_chart(path: &Path, title: &str, y_desc: &str, bars: &[Bar]) -> Result<()> {
    check_svg(path)?;
    if bars.is_empty() {
        return Err(plot_err(path, "nothing to plot"));
    }
    let width = (120 + 28 * bars.len()).max(640) as u32;
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let lo = bars.iter().map(|b| b.value).fold(0.0, f64::min);
    let hi = bars.iter().map(|b| b.value).fold(0.0, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-9);
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(110)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len()).into_segmented(), (lo - pad)..(hi + pad))
        .map_err(|e| plot_err(path, e))?;
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
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let (x0, x1) = (SegmentValue::Exact(i), SegmentValue::Exact(i + 1));
            let mut r = Rectangle::new([(x0, 0.0), (x1, b.value)], color(b.group).filled());
            r.set_margin(0, 0, 3, 3);
            r
        }))
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

/// A line chart; `log_y` plots `log10(y)` (points with `y <= 0` are dropped).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    check_svg(path)?;
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
    let all = || pts.iter().flatten();
    if all().next().is_none() {
        return Err(plot_err(path, "nothing to plot"));
    }
    let (x0, x1) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let ypad = ((y1 - y0) * 0.05).max(0.1);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - ypad)..(y1 + ypad))
        .map_err(|e| plot_err(path, e))?;
    let y_desc = if log_y { format!("log10 {y_desc}") } else { y_desc.to_string() };
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(|e| plot_err(path, e))?;
    for (s, p) in series.iter().zip(pts) {
        let c = color(s.group);
        let style = if s.thin { c.stroke_width(1) } else { c.stroke_width(3) };
        chart
            .draw_series(LineSeries::new(p, style))
            .map_err(|e| plot_err(path, e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}
