//! The predictions CSV that `mae-train eval --predictions` and `mae-run eval --predictions` both
//! write: one row per image in data-set order, `index[,input],label,prediction,p0,p1,...`, labels
//! as space-separated class indices, predicted class names space-separated (several for
//! multi-label tasks), probabilities with 7 decimals.

use std::fmt::Write as _;

/// A predictions CSV being written row by row.
#[derive(Debug)]
pub struct PredictionsCsv {
    text: String,
    with_input: bool,
}

impl PredictionsCsv {
    /// The header for `num_classes` probability columns, with an `input` column when the rows
    /// name their inputs.
    pub fn new(num_classes: usize, with_input: bool) -> Self {
        let mut text = String::from(if with_input {
            "index,input,label,prediction"
        } else {
            "index,label,prediction"
        });
        for i in 0..num_classes.max(1) {
            let _ = write!(text, ",p{i}");
        }
        text.push('\n');
        Self { text, with_input }
    }

    /// One row; `input` is written only when the header has that column.
    pub fn push(
        &mut self,
        index: usize,
        input: Option<&str>,
        label: &[i64],
        predicted: &[String],
        probs: &[f32],
    ) {
        let _ = write!(self.text, "{index}");
        if self.with_input {
            let _ = write!(self.text, ",{}", csv_field(input.unwrap_or("")));
        }
        let label: Vec<String> = label.iter().map(i64::to_string).collect();
        let _ = write!(
            self.text,
            ",{},{}",
            label.join(" "),
            csv_field(&predicted.join(" "))
        );
        for v in probs {
            let _ = write!(self.text, ",{v:.7}");
        }
        self.text.push('\n');
    }

    pub fn into_string(self) -> String {
        self.text
    }
}

/// A CSV field, quoted (with inner quotes doubled) when it holds a comma, quote or line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_quoting() {
        let mut c = PredictionsCsv::new(2, true);
        c.push(
            0,
            Some("a,b.png"),
            &[1],
            &["pneumonia".into()],
            &[0.25, 0.75],
        );
        c.push(
            1,
            Some("say \"hi\".png"),
            &[0, 1],
            &["x".into(), "y".into()],
            &[0.5, 0.5],
        );
        assert_eq!(
            c.into_string(),
            "index,input,label,prediction,p0,p1\n\
             0,\"a,b.png\",1,pneumonia,0.2500000,0.7500000\n\
             1,\"say \"\"hi\"\".png\",0 1,x y,0.5000000,0.5000000\n"
        );
        let mut c = PredictionsCsv::new(3, false);
        c.push(4, Some("ignored"), &[2], &["c".into()], &[0.0, 0.0, 1.0]);
        assert_eq!(
            c.into_string(),
            "index,label,prediction,p0,p1,p2\n4,2,c,0.0000000,0.0000000,1.0000000\n"
        );
    }
}
