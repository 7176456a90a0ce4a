//! The ramp plot: throughput (left axis) and p99 (right axis) per step,
//! with the target line and the p99 bound. SVG only.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::ramp::RampReport;

pub fn ramp_svg(path: &Path, r: &RampReport) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let x_max = r.steps.iter().map(|s| s.rate).fold(1.0f64, f64::max) * 1.05;
    let y_max = r
        .steps
        .iter()
        .map(|s| s.acked_per_sec.max(s.rate))
        .fold(1.0f64, f64::max)
        * 1.1;
    let p99_max = r
        .steps
        .iter()
        .filter_map(|s| s.p99_ms)
        .fold(r.p99_bound_ms, f64::max)
        * 1.2;

    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = match r.highest_passing_rate {
        Some(rate) => format!(
            "highest rate with p99 < {} ms: {rate:.0} msg/s",
            r.p99_bound_ms
        ),
        None => format!("no step kept p99 < {} ms", r.p99_bound_ms),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?
        .set_secondary_coord(0f64..x_max, 0f64..p99_max);
    chart
        .configure_mesh()
        .x_desc("target rate (msg/s)")
        .y_desc("acknowledged (msg/s)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency (ms)")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(|e| err(&e))?;

    let target = ShapeStyle::from(&BLACK.mix(0.3)).stroke_width(1);
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (x_max, x_max)], target))
        .map_err(|e| err(&e))?
        .label("target")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], target));

    let thr: Vec<(f64, f64)> = r.steps.iter().map(|s| (s.rate, s.acked_per_sec)).collect();
    let blue = ShapeStyle::from(&BLUE).stroke_width(2);
    chart
        .draw_series(LineSeries::new(thr.clone(), blue))
        .map_err(|e| err(&e))?
        .label("acknowledged msg/s")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue));
    chart
        .draw_series(thr.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
        .map_err(|e| err(&e))?;

    let p99: Vec<(f64, f64)> = r
        .steps
        .iter()
        .filter_map(|s| s.p99_ms.map(|p| (s.rate, p)))
        .collect();
    let red = ShapeStyle::from(&RED).stroke_width(2);
    chart
        .draw_secondary_series(LineSeries::new(p99.clone(), red))
        .map_err(|e| err(&e))?
        .label("p99 ms (right axis)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], red));
    chart
        .draw_secondary_series(r.steps.iter().filter_map(|s| {
            s.p99_ms.map(|p| {
                let style = if s.pass {
                    RED.filled()
                } else {
                    RED.stroke_width(2)
                };
                Circle::new((s.rate, p), 4, style)
            })
        }))
        .map_err(|e| err(&e))?;
    let bound = ShapeStyle::from(&RED.mix(0.4)).stroke_width(1);
    chart
        .draw_secondary_series(LineSeries::new(
            [(0.0, r.p99_bound_ms), (x_max, r.p99_bound_ms)],
            bound,
        ))
        .map_err(|e| err(&e))?
        .label("p99 bound")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], bound));

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ramp::StepResult;

    #[test]
    fn writes_an_svg() {
        let step = |rate: f64, p99: f64, pass| StepResult {
            rate,
            planned: 10,
            sent: 10,
            acked: 10,
            failed: 0,
            acked_per_sec: rate * 0.99,
            p50_ms: Some(p99 / 2.0),
            p99_ms: Some(p99),
            max_ms: Some(p99 * 2.0),
            over_bound: 0,
            pass,
        };
        let r = RampReport {
            p99_bound_ms: 10.0,
            highest_passing_rate: Some(2000.0),
            steps: vec![
                step(1000.0, 1.0, true),
                step(2000.0, 3.0, true),
                step(3000.0, 30.0, false),
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ramp.svg");
        ramp_svg(&path, &r).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("p99 latency (ms)"));
        assert!(svg.contains("2000 msg/s"));
    }
}
