//! `report`: a dated markdown report with SVG plots from one or more `compare` results, and its
//! row in the reports index (`README.md` of the output directory), whose "latest latency" section
//! it replaces. The rest of the index, kept by hand, is left as it is.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::compare::{command_line, CompareResult};
use crate::plot;

/// Marks the start of the section `report` owns in the index.
const BEGIN: &str = "<!-- latest-latency:begin -->";
/// Marks its end.
const END: &str = "<!-- latest-latency:end -->";
/// The header of the index table.
const INDEX_HEADER: &str = "| date | report | what |";

/// Options of `report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// A `compare --out` JSON file (repeat for more).
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// Directory of the reports and their index (README.md).
    #[arg(long, default_value = "perf-reports")]
    out_dir: PathBuf,
    /// Report name: files are DATE-NAME.md, DATE-NAME-cdf.svg, ...
    #[arg(long, default_value = "latency")]
    name: String,
    /// Title of the report (and its line in the index) [default: "Latency: PEERS"].
    #[arg(long)]
    title: Option<String>,
    /// A paragraph placed under the title (what was measured, how the paths are built).
    #[arg(long)]
    note: Option<String>,
}

/// The load of a result in a few words, e.g. "tcp closed loop, 64 B, 1 connection".
fn load_words(r: &CompareResult) -> String {
    let s = &r.settings;
    let rate = s.rate.map_or("closed loop".into(), |r| {
        format!("open loop at {r:.0} requests/s")
    });
    format!(
        "{} {rate}, {} B, {} connection{}",
        s.mode.as_str(),
        s.size,
        s.connections,
        if s.connections == 1 { "" } else { "s" }
    )
}

/// Label of a peer in tables and plots: its name, plus the load when several inputs are shown.
fn label(r: &CompareResult, peer: &str, several: bool) -> String {
    if several {
        format!("{peer} ({})", load_words(r))
    } else {
        peer.to_string()
    }
}

/// The headline table of one result.
fn headline(r: &CompareResult, several: bool) -> String {
    let mut t = String::from(
                "| peer | p50 µs | p99 µs | p99.9 µs | p50 vs direct | p99 vs direct | added p50 / p99 / p99.9 µs | requests/s | RSS MiB |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
    for p in &r.peers {
        let (l, s) = (&p.summary.latency, &p.summary);
        t += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.0} | {} |\n",
            label(r, &p.name, several),
            l.p50_us,
            l.p99_us,
            l.p999_us,
            x(s.ratio_p50),
            x(s.ratio_p99),
            match (s.added_p50_us, s.added_p99_us, s.added_p999_us) {
                (Some(a), Some(b), Some(c)) => format!("{a:+.1} / {b:+.1} / {c:+.1}"),
                _ => "-".into(),
            },
            s.rate_achieved,
            p.rss_kib
                .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
        );
    }
    t
}

/// The paragraph under a headline table: the load, skipped peers, the sockperf check.
fn notes(r: &CompareResult) -> String {
    let s = &r.settings;
    let mut n = format!(
        "`ringside-bench compare`, {}: {} interleaved rounds of {} s (after {} s of warm-up), medians \
         over rounds. Latency counts from the intended send time (coordinated-omission corrected; \
         in a closed loop that is the service time). Ratios are to the direct path of the same run.\n",
        load_words(r),
        s.rounds,
        s.duration_s,
        s.warmup_s
    );
    for sk in &r.skipped {
        n += &format!("\nSkipped: {} ({}).\n", sk.name, sk.reason);
    }
    match &r.sockperf_check {
        Some(c) => {
            n += &format!(
                "\nMeasurement check: {} (sockperf p50 {:.1} µs, p99 {:.1} µs; ringside-bench p50 {:.1} µs, \
                 p99 {:.1} µs; both clients against `sockperf server`).\n",
                c.summary(),
                c.sockperf_median.p50_us,
                c.sockperf_median.p99_us,
                c.ours_median.p50_us,
                c.ours_median.p99_us
            )
        }
        None => n += "\nMeasurement check: the sockperf agreement check did not run.\n",
    }
    n
}

/// `report`.
pub fn main(args: ReportArgs) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for p in &args.inputs {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let r: CompareResult = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a compare result", p.display()))?;
        results.push(r);
    }
    let date = results[0].date.get(..10).unwrap_or("unknown").to_string();
    let stem = format!("{date}-{}", args.name);
    std::fs::create_dir_all(&args.out_dir)?;
    let several = results.len() > 1;

    let (mut curves, mut rps, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for r in &results {
        for p in &r.peers {
            let color = curves.len();
            let name = label(r, &p.name, several);
            curves.push((name.clone(), p.summary.curve.clone()));
            rps.push((name.clone(), p.summary.rate_achieved, color));
            if let Some(k) = p.rss_kib {
                rss.push((name, k as f64 / 1024.0, color));
            }
        }
    }
    let file = |suffix: &str| format!("{stem}{suffix}");
    plot::percentile_spectrum(&args.out_dir.join(file("-cdf.svg")), &curves)?;
    plot::bars(
        &args.out_dir.join(file("-throughput.svg")),
        "Requests per second (median over rounds)",
        "requests/s",
        &rps,
    )?;
    plot::bars(
        &args.out_dir.join(file("-memory.svg")),
        "Resident memory (VmRSS; paths in pods: largest sidecar under load)",
        "MiB",
        &rss,
    )?;

    let peers: Vec<&str> = results[0].peers.iter().map(|p| p.name.as_str()).collect();
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| format!("Latency: {}", peers.join(", ")));
    let mut md = format!("# {title} ({date})\n\n");
    if let Some(note) = &args.note {
        md += &format!("{note}\n\n");
    }
    let mut tables = String::new();
    for r in &results {
        if several {
            md += &format!("## {}\n\n", load_words(r));
            tables += &format!("{}:\n\n", load_words(r));
        }
        let t = headline(r, false);
        md += &format!("{t}\n{}\n", notes(r));
        tables += &format!("{t}\n");
    }
    md += &format!(
        "## Plots\n\n![Latency by percentile]({0}-cdf.svg)\n\n![Requests per second]({0}-throughput.svg)\n\n\
         ![Resident memory]({0}-memory.svg)\n\n",
        stem
    );
    let m = &results[0].machine;
    md += &format!(
        "## Machine\n\n- CPU: {} ({} cores)\n- memory: {:.1} GiB\n- kernel: {}\n",
        m.cpu,
        m.cores,
        m.memory_kib as f64 / 1024.0 / 1024.0,
        m.kernel
    );
    for (k, v) in &m.versions {
        md += &format!("- {k}: {v}\n");
    }
    md += "\n## Commands\n\n```\n";
    for r in &results {
        md += &format!("{}    # {}\n", r.command, r.date);
    }
    md += &format!("{}\n```\n\nPeers as started:\n\n", command_line());
    for r in &results {
        for p in &r.peers {
            md += &format!("- {}: `{}`\n", p.name, p.command);
            if let Some(c) = &p.config {
                md += &format!(
                    "\n  ```\n  {}\n  ```\n\n",
                    c.trim_end().replace('\n', "\n  ")
                );
            }
        }
    }
    let md_path = args.out_dir.join(file(".md"));
    std::fs::write(&md_path, md)?;
    let what = format!(
        "{}: {} ({})",
        title,
        peers.join(", "),
        results
            .iter()
            .map(load_words)
            .collect::<Vec<_>>()
            .join("; ")
    );
    let latest = format!(
        "## Latest latency headline: {title} ({date}, [{0}]({0}))\n\n{tables}",
        file(".md")
    );
    update_index(
        &args.out_dir.join("README.md"),
        &date,
        &file(".md"),
        &what,
        &latest,
    )?;
    println!("wrote {}", md_path.display());
    Ok(())
}

/// Add the report's row to the index table (once) and replace the latest-latency section.
fn update_index(
    path: &Path,
    date: &str,
    file: &str,
    what: &str,
    latest: &str,
) -> anyhow::Result<()> {
    let mut text = std::fs::read_to_string(path)
        .unwrap_or_else(|_| format!("# Performance reports\n\n{INDEX_HEADER}\n|---|---|---|\n"));
    if !text.contains(INDEX_HEADER) {
        text = format!("{}\n\n{INDEX_HEADER}\n|---|---|---|\n", text.trim_end());
    }
    // The first line after the index table.
    let table_end = |text: &str| {
        let start = text.find(INDEX_HEADER).unwrap_or(0);
        let mut end = start;
        for line in text[start..].split_inclusive('\n') {
            if !line.starts_with('|') {
                break;
            }
            end += line.len();
        }
        end
    };
    if !text.contains(&format!("[{file}]({file})")) {
        let end = table_end(&text);
        let nl = if text[..end].ends_with('\n') {
            ""
        } else {
            "\n"
        };
        text.insert_str(
            end,
            &format!("{nl}| {date} | [{file}]({file}) | {what} |\n"),
        );
    }
    let section = format!("{BEGIN}\n{}\n{END}", latest.trim_end());
    match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => text.replace_range(b..e + END.len(), &section),
        _ => {
            let end = table_end(&text);
            text.insert_str(end, &format!("\n{section}\n"));
        }
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
