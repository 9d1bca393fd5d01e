//! The bench's SVG chart (plotters, SVG backend only): one panel per measure, a horizontal bar
//! per system, so the README can show the whole comparison at a glance.

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::bench::Figures;

const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 230;
/// Bar colours: Prism's rows stand out, the references and peers are grey and blue.
const PRISM: RGBColor = RGBColor(0xd9, 0x5f, 0x02);
const REFERENCE: RGBColor = RGBColor(0x99, 0x99, 0x99);
const PEER: RGBColor = RGBColor(0x1f, 0x78, 0xb4);

/// One panel: a title, and how to read its value from a system's figures.
struct Panel {
    title: &'static str,
    value: fn(&Figures) -> Option<f64>,
}

const PANELS: [Panel; 9] = [
    Panel {
        title: "one flow upload, Gbit/s (higher is better)",
        value: |f| f.up_mbit.map(|v| v / 1000.0),
    },
    Panel {
        title: "one flow download, Gbit/s (higher is better)",
        value: |f| f.down_mbit.map(|v| v / 1000.0),
    },
    Panel {
        title: "one flow upload over IPv6, Gbit/s (higher is better)",
        value: |f| f.up_v6_mbit.map(|v| v / 1000.0),
    },
    Panel {
        title: "one flow download over IPv6, Gbit/s (higher is better)",
        value: |f| f.down_v6_mbit.map(|v| v / 1000.0),
    },
    Panel {
        title: "1-byte request/response p50, µs (lower is better)",
        value: |f| f.rr_p50_us,
    },
    Panel {
        title: "1-byte request/response p50 over IPv6, µs (lower is better)",
        value: |f| f.rr_v6_p50_us,
    },
    Panel {
        title: "new connections per second (higher is better)",
        value: |f| f.conn_per_s,
    },
    Panel {
        title: "new connections per second over IPv6 (higher is better)",
        value: |f| f.conn_v6_per_s,
    },
    Panel {
        title: "RSS with 2,000 connections held, MB (lower is better)",
        value: |f| f.rss_2000_mb,
    },
];

fn colour(name: &str) -> RGBColor {
    if name.starts_with("prism") {
        PRISM
    } else if name.starts_with("kernel") || name.starts_with("bare") {
        REFERENCE
    } else {
        PEER
    }
}

/// The chart as an SVG document.
pub(crate) fn render(results: &[Figures]) -> Result<String> {
    let mut svg = String::new();
    let height = PANEL_HEIGHT * PANELS.len() as u32;
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
        for (panel, area) in PANELS
            .iter()
            .zip(root.split_evenly((PANELS.len(), 1)).iter())
        {
            draw_panel(area, panel, results)?;
        }
        root.present().map_err(|e| anyhow!("chart: {e}"))?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    results: &[Figures],
) -> Result<()> {
    // Every system keeps its row in every panel, so the panels line up; a system without this
    // measure has a label and no bar.
    let rows: Vec<(&str, Option<f64>)> = results
        .iter()
        .map(|f| (f.name.as_str(), (panel.value)(f)))
        .collect();
    let max = rows
        .iter()
        .filter_map(|&(_, v)| v)
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let n = rows.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(300)
        .build_cartesian_2d(0.0..max, 0.0..n as f64)
        .map_err(|e| anyhow!("chart: {e}"))?;
    let names: Vec<&str> = rows.iter().map(|&(name, _)| name).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            // Labels sit at the middle of each bar (k + 0.5); the rest stay blank.
            let k = (*y - 0.5).round();
            if (*y - 0.5 - k).abs() < 1e-6 && k >= 0.0 {
                names
                    .get(n - 1 - k as usize)
                    .map(|s| (*s).to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    // The first system is drawn at the top.
    chart
        .draw_series(rows.iter().enumerate().filter_map(|(i, &(name, v))| {
            let y = (n - 1 - i) as f64;
            v.map(|v| Rectangle::new([(0.0, y + 0.15), (v, y + 0.85)], colour(name).filled()))
        }))
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, &(_, v))| {
            let y = (n - 1 - i) as f64 + 0.5;
            let (x, label) = match v {
                Some(v) if v >= 100.0 => (v, format!(" {v:.0}")),
                Some(v) => (v, format!(" {v:.1}")),
                None => (0.0, " not measured".to_owned()),
            };
            Text::new(label, (x, y), ("sans-serif", 12).into_font())
        }))
        .map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}

/// One panel of grouped bars: a bar per series (system) in each group (a WAN cell).
pub(crate) struct Grouped {
    pub(crate) title: String,
    pub(crate) groups: Vec<String>,
    /// Each series' name and its value in each group (`None`: not measured).
    pub(crate) series: Vec<(String, Vec<Option<f64>>)>,
    /// Draw the series' legend (room is kept above the bars for it).
    pub(crate) legend: bool,
}

/// Colours of grouped series, in order (Prism's orange is kept for a series named Prism).
const SERIES: [RGBColor; 5] = [
    RGBColor(0x99, 0x99, 0x99),
    RGBColor(0x1f, 0x78, 0xb4),
    RGBColor(0xa6, 0xce, 0xe3),
    RGBColor(0x33, 0xa0, 0x2c),
    RGBColor(0x6a, 0x3d, 0x9a),
];

fn series_colour(name: &str, i: usize) -> RGBColor {
    if name.starts_with("Prism") {
        PRISM
    } else {
        SERIES[i % SERIES.len()]
    }
}

/// Panels of grouped vertical bars, one under the other, each with its legend, as an SVG
/// document (the WAN bench's chart).
pub(crate) fn render_grouped(panels: &[Grouped]) -> Result<String> {
    let mut svg = String::new();
    let height = GROUPED_HEIGHT * panels.len().max(1) as u32;
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
        for (panel, area) in panels
            .iter()
            .zip(root.split_evenly((panels.len().max(1), 1)).iter())
        {
            draw_grouped(area, panel)?;
        }
        root.present().map_err(|e| anyhow!("chart: {e}"))?;
    }
    Ok(svg)
}

const GROUPED_HEIGHT: u32 = 330;

/// Tenths of a bar: the x axis counts in them, so that each group's label sits on a whole
/// key point at the group's middle.
const TENTHS: i32 = 10;

fn draw_grouped(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Grouped,
) -> Result<()> {
    // Each group: a bar per series and one bar's gap.
    let per_group = panel.series.len() as i32 + 1;
    let width = (panel.groups.len() as i32 * per_group).max(1) * TENTHS;
    let max = panel
        .series
        .iter()
        .flat_map(|(_, values)| values.iter().flatten())
        .fold(0.0f64, |m, &v| m.max(v))
        .max(1e-9)
        * if panel.legend { 1.8 } else { 1.15 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .set_label_area_size(LabelAreaPosition::Bottom, 30)
        .build_cartesian_2d(0..width, 0.0..max)
        .map_err(|e| anyhow!("chart: {e}"))?;
    let groups = &panel.groups;
    // The middle of group g's bars (the gap is the group's last bar).
    let middle = |g: i32| g * per_group * TENTHS + (per_group - 1) * TENTHS / 2;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .set_tick_mark_size(LabelAreaPosition::Bottom, 0)
        .x_labels(width as usize + 1)
        .x_label_formatter(&|x| {
            (0..groups.len() as i32)
                .find(|&g| middle(g) == *x)
                .and_then(|g| groups.get(g as usize).cloned())
                .unwrap_or_default()
        })
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    for (i, (name, values)) in panel.series.iter().enumerate() {
        let colour = series_colour(name, i);
        chart
            .draw_series(values.iter().enumerate().filter_map(|(g, v)| {
                let x = (g as i32 * per_group + i as i32) * TENTHS;
                v.map(|v| Rectangle::new([(x + 1, 0.0), (x + TENTHS - 1, v)], colour.filled()))
            }))
            .map_err(|e| anyhow!("chart: {e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    if panel.legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| anyhow!("chart: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(name: &str, up: f64, rss: Option<f64>) -> Figures {
        Figures {
            name: name.to_owned(),
            up_mbit: Some(up),
            rss_2000_mb: rss,
            ..Figures::default()
        }
    }

    #[test]
    fn grouped_panels_have_a_bar_per_measured_value_and_a_legend() {
        let panel = Grouped {
            title: "one flow down".to_owned(),
            groups: vec!["0% loss".to_owned(), "2% loss".to_owned()],
            series: vec![
                ("no VPN".to_owned(), vec![Some(90.0), Some(80.0)]),
                ("Prism (TCP via SOCKS5)".to_owned(), vec![Some(91.0), None]),
            ],
            legend: true,
        };
        let svg = render_grouped(&[panel]).unwrap().replace('\n', "");
        for label in [
            "one flow down",
            "0% loss",
            "2% loss",
            "no VPN",
            "Prism (TCP via SOCKS5)",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        // Prism's one measured bar and its legend swatch, in Prism's colour.
        assert_eq!(
            svg.matches("#D95F02").count() + svg.matches("#d95f02").count(),
            2
        );
    }

    #[test]
    fn every_system_with_a_value_gets_a_labelled_bar() {
        let results = [
            figures("kernel routing, no TUN", 22000.0, None),
            figures("prism, direct", 4300.0, Some(82.0)),
            figures("tun2proxy", 400.0, Some(113.0)),
        ];
        let svg = render(&results).unwrap().replace('\n', "");
        for name in ["kernel routing, no TUN", "prism, direct", "tun2proxy"] {
            assert!(svg.contains(name), "{name} missing");
        }
        // Upload values in Gbit/s, and the RSS panel only for the two that have one.
        assert!(svg.contains("> 22.0<") && svg.contains("> 4.3<") && svg.contains("> 0.4<"));
        assert!(svg.contains("> 82.0<") && svg.contains("> 113<"));
        // The kernel has no RSS figure, and every panel but upload and RSS is empty.
        assert_eq!(
            svg.matches("> not measured<").count(),
            1 + 3 * (PANELS.len() - 2)
        );
        assert_eq!(
            svg.matches("#D95F02").count() + svg.matches("#d95f02").count(),
            2
        );
    }
}
