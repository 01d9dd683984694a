//! Conversion of OpenMetrics text (what the `prometheus-client` crate writes) to the classic
//! Prometheus text format 0.0.4 that `/metrics` endpoints serve: every scraper and `promtool
//! check metrics` read it. The differences that matter: counter families are named with their
//! `_total` suffix in `# HELP`/`# TYPE`, there are no `# UNIT` lines and no `# EOF` terminator.

/// Content type of the converted text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4.
pub fn from_openmetrics(text: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some("counter")) = (parts.next(), parts.next()) {
                counters.insert(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            (counters.contains(name) && !name.ends_with("_total"))
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_name_and_the_terminator_goes() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# UNIT g seconds\n# EOF\n";
        assert_eq!(
            from_openmetrics(om),
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
