//! `portcullis-bench peers --chart FILE`: the run's figures as an SVG
//! (plotters): node CPU per dropped packet for each configuration, and
//! knock-to-open p50 and p99 for each client.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One bar: a label and its value(s).
pub struct Bar {
    pub label: String,
    pub value: f64,
    /// A second value drawn over the first (p99 behind p50), if any.
    pub upper: Option<f64>,
}

/// Draws one horizontal bar panel per (title, unit, bars), stacked.
pub fn draw(file: &Path, panels: &[(String, &str, Vec<Bar>)]) -> Result<()> {
    let height = panels
        .iter()
        .map(|p| 80 + 34 * p.2.len() as u32)
        .sum::<u32>();
    let root = SVGBackend::new(file, (900, height.max(200))).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    let mut area = root;
    for (title, unit, bars) in panels {
        let h = 80 + 34 * bars.len() as u32;
        let (top, rest) = area.split_vertically(h);
        panel(&top, title, unit, bars)?;
        area = rest;
    }
    area.present().map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    bars: &[Bar],
) -> Result<()> {
    let max = bars
        .iter()
        .map(|b| b.upper.unwrap_or(b.value).max(b.value))
        .fold(0.0, f64::max)
        * 1.15;
    let n = bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max.max(1e-9), -0.5..n as f64 - 0.5)
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| {
            // Bars sit on whole numbers, the first at the top.
            let r = y.round();
            if (y - r).abs() > 0.01 || r < 0.0 {
                return String::new();
            }
            n.checked_sub(1 + r as usize)
                .and_then(|i| bars.get(i))
                .map(|b| b.label.clone())
                .unwrap_or_default()
        })
        .x_desc(unit)
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    for (i, b) in bars.iter().enumerate() {
        // The first bar at the top.
        let y = (n - 1 - i) as f64;
        if let Some(u) = b.upper {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y - 0.3), (u, y + 0.3)],
                    RGBColor(180, 200, 230).filled(),
                )))
                .map_err(|e| anyhow!("chart: {e}"))?;
        }
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.3), (b.value, y + 0.3)],
                RGBColor(40, 90, 160).filled(),
            )))
            .map_err(|e| anyhow!("chart: {e}"))?;
        let text = match b.upper {
            Some(u) => format!("{:.2} / {:.2}", b.value, u),
            None => format!("{:.0}", b.value),
        };
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (
                    b.upper.unwrap_or(b.value).max(b.value) + max * 0.01,
                    y + 0.15,
                ),
                ("sans-serif", 13),
            )))
            .map_err(|e| anyhow!("chart: {e}"))?;
    }
    Ok(())
}
