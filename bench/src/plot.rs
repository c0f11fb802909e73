//! SVG plots for the report (plotters, SVG backend only: text is written as SVG text elements, so
//! no font library is needed).

use std::path::Path;

use plotters::prelude::*;

use crate::load::CurvePoint;

/// Percentile label of a percentile-spectrum x value 1/(1-q): 10 -> "90%", 1000 -> "99.9%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let s = format!("{p:.4}");
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

/// The latency percentile spectrum: x = 1/(1-q) on a log scale (labelled as percentiles), y =
/// latency in µs on a log scale; one line per series.
pub fn percentile_spectrum(
    path: &Path,
    series: &[(String, Vec<CurvePoint>)],
) -> anyhow::Result<()> {
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, c)| {
            c.iter()
                .filter(|p| p.q < 1.0 && p.us > 0.0)
                .map(|p| (1.0 / (1.0 - p.q), p.us))
                .collect()
        })
        .collect();
    let all = points.iter().flatten();
    let x_max = all.clone().map(|p| p.0).fold(10.0, f64::max);
    let y_min = all
        .clone()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(1e9);
    let y_max = all.map(|p| p.1).fold(1.0, f64::max);
    let (y_min, y_max) = if y_min.is_finite() && y_min < y_max {
        (y_min * 0.8, y_max * 1.25)
    } else {
        (1.0, 10.0)
    };
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency by percentile", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..x_max).log_scale(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, ((name, _), pts)) in series.iter().zip(points).enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(pts, color))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A bar chart: one bar per (name, value), each in the color of that name's line in the
/// percentile plot (`colors[i]` is its palette index).
pub fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    data: &[(String, f64, usize)],
) -> anyhow::Result<()> {
    let y_max = data.iter().map(|d| d.1).fold(0.0, f64::max).max(1e-9) * 1.2;
    let n = data.len().max(1) as u32;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((0..n.saturating_sub(1).max(1)).into_segmented(), 0.0..y_max)?;
    let label = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(i) => data.get(*i as usize).map_or(String::new(), |d| d.0.clone()),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(data.len().max(1))
        .x_label_formatter(&label)
        .y_label_formatter(&|y| {
            if y_max >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .y_desc(y_desc)
        .draw()?;
    let color_of = |v: &SegmentValue<u32>| match v {
        SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => {
            data.get(*i as usize).map_or(0, |d| d.2)
        }
        SegmentValue::Last => 0,
    };
    chart.draw_series(
        Histogram::vertical(&chart)
            .style_func(|x, _| Palette99::pick(color_of(x)).filled())
            .margin(25)
            .data(data.iter().enumerate().map(|(i, d)| (i as u32, d.1))),
    )?;
    chart.draw_series(data.iter().enumerate().map(|(i, d)| {
        let text = if d.1 >= 100.0 {
            format!("{:.0}", d.1)
        } else {
            format!("{:.1}", d.1)
        };
        Text::new(
            text,
            (SegmentValue::CenterOf(i as u32), d.1 + y_max * 0.05),
            ("sans-serif", 14).into_font(),
        )
    }))?;
    root.present()?;
    Ok(())
}
