//! One problem found in a bundle, located and rendered the way Cedar's own
//! tools print it (a miette report with the offending source text).

use std::fmt;

use miette::{
    Diagnostic as MietteDiagnostic, GraphicalReportHandler, GraphicalTheme, LabeledSpan,
    NamedSource, Severity, SourceCode,
};

/// A located, rendered problem. The bundle is refused while any remain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Bundle-relative path of the file at fault, when one is.
    pub file: Option<String>,
    /// 1-based line and column of the offending text, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The one-line message (lowercase, no final period, as Cedar writes them).
    pub message: String,
    /// The full report: message, source snippet with a caret, help.
    pub rendered: String,
}

impl Diagnostic {
    /// A problem with no source text to point into (I/O, cross-file checks).
    pub fn plain(file: Option<&str>, message: impl Into<String>) -> Self {
        let message = message.into();
        let location = file.map(|f| format!("{f}: ")).unwrap_or_default();
        Self {
            file: file.map(str::to_owned),
            line: None,
            column: None,
            rendered: format!("{location}error: {message}\n"),
            message,
        }
    }

    /// A problem reported by Cedar (or serde) against `text`, the contents of
    /// `file`. Labels of `inner` are offsets into `text`.
    pub fn from_miette(file: &str, text: &str, inner: &dyn MietteDiagnostic) -> Self {
        let located = Located {
            inner,
            source: NamedSource::new(file, text.to_owned()),
        };
        let first_offset = inner
            .labels()
            .and_then(|mut labels| labels.next())
            .map(|label| label.offset());
        let (line, column) = match first_offset {
            Some(offset) => {
                let (l, c) = line_column(text, offset);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        let message = full_message(inner);
        let mut rendered = match (line, column) {
            (Some(l), Some(c)) => format!("{file}:{l}:{c}: error: {message}\n"),
            _ => format!("{file}: error: {message}\n"),
        };
        let handler =
            GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(100);
        // Rendering into a String cannot fail; keep the header if it ever does.
        let _ = handler.render_report(&mut rendered, &located);
        Self {
            file: Some(file.to_owned()),
            line,
            column,
            message,
            rendered,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rendered)
    }
}

/// The message of a diagnostic with its causes, so that wrapper errors such
/// as "failed to parse schema" still say what is wrong.
pub(crate) fn full_message(err: &dyn MietteDiagnostic) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before
        .get(line_start..)
        .map(|s| s.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

/// Shows `inner` against a named copy of its file, without its related
/// diagnostics (each of those becomes a [`Diagnostic`] of its own).
struct Located<'a> {
    inner: &'a dyn MietteDiagnostic,
    source: NamedSource<String>,
}

impl fmt::Debug for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.inner, f)
    }
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.inner, f)
    }
}

impl std::error::Error for Located<'_> {}

impl MietteDiagnostic for Located<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.code()
    }
    fn severity(&self) -> Option<Severity> {
        self.inner.severity()
    }
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.help()
    }
    fn url<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.url()
    }
    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.source)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.inner.labels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "ab\ncd\nef";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (2, 2));
        assert_eq!(line_column(text, 6), (3, 1));
        assert_eq!(line_column(text, 100), (3, 3));
    }

    #[test]
    fn plain_diagnostic_names_the_file() {
        let d = Diagnostic::plain(Some("a.cedar"), "cannot read file");
        assert_eq!(d.rendered, "a.cedar: error: cannot read file\n");
    }
}
