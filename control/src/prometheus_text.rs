//! Reads Prometheus' text exposition (what vLLM, the gateway and the cache nodes serve on
//! `/metrics`): each sample's name, labels and value. Pure; comments, blank lines and lines it
//! cannot read are skipped (one odd line does not lose a scrape).

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(key, value)` of `matchers` is among its labels.
    pub fn matches(&self, matchers: &[(String, String)]) -> bool {
        matchers
            .iter()
            .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

/// Every sample of `text`.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| sample(line.trim()))
        .collect()
}

/// The sum of the samples named `name` whose labels include `matchers`; None when there is none.
pub fn sum(samples: &[Sample], name: &str, matchers: &[(String, String)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && s.matches(matchers))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

fn sample(line: &str) -> Option<Sample> {
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let rest = if let Some(body) = line[name_end..].strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // key
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let key_start = chars.peek()?.0;
            let mut key_end = key_start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
            }
            let key = body[key_start..key_end].trim().to_string();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
        &body[end? + 1..]
    } else {
        &line[name_end..]
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_labels_and_values_are_read_and_odd_lines_skipped() {
        let text = "# HELP vllm:num_requests_running x\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"tiny\"} 3.0\n\
            vllm:num_requests_running{engine=\"1\",model_name=\"a,b=\\\"c\\\"\"} 2\n\
            kvcache_pool_used_bytes 1.5e9\n\
            vllm:time_to_first_token_seconds_bucket{le=\"+Inf\"} 7 1700000000\n\
            garbage {{{\n\n";
        let s = parse(text);
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[1].labels[1],
            ("model_name".to_string(), "a,b=\"c\"".to_string())
        );
        assert_eq!(sum(&s, "vllm:num_requests_running", &[]), Some(5.0));
        let engine0 = [("engine".to_string(), "0".to_string())];
        assert_eq!(sum(&s, "vllm:num_requests_running", &engine0), Some(3.0));
        assert_eq!(sum(&s, "kvcache_pool_used_bytes", &[]), Some(1.5e9));
        assert_eq!(sum(&s, "absent", &[]), None);
        assert_eq!(s[3].value, 7.0);
    }
}
