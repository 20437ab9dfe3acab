//! The hash chain: how a record is sealed, and how a trail is verified.
//!
//! A record is one JSON object per line. Sealing adds `seq` (one more than
//! the previous record's), `prev_hash` (the previous record's `hash`; 64
//! zeros for the first record of a trail) and `hash`: the SHA-256, in hex,
//! of the record's canonical encoding without `hash` — keys sorted at every
//! level, no whitespace, strings escaped as JSON does. Verification
//! recomputes every hash and follows the links, so an edited, deleted,
//! inserted or reordered record breaks the chain at the first one touched.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// `prev_hash` of the first record of a trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The chain's head: the next record's `seq` and `prev_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub next_seq: u64,
    pub prev_hash: String,
}

impl Head {
    pub fn genesis() -> Self {
        Self {
            next_seq: 0,
            prev_hash: GENESIS.to_owned(),
        }
    }
}

/// A record type whose fields serialize in the canonical order: declared
/// alphabetically (and so are those of every struct inside it), with any
/// free-form JSON inside passed through [`sorted`].
pub trait Link: serde::Serialize {
    fn link(&mut self, seq: u64, prev_hash: String);
}

/// Seals `record` as the next link after `head`: its fields serialize
/// straight into the canonical encoding, which is hashed; the line is that
/// encoding with `hash` appended. Returns the line (with the final newline)
/// and advances `head`.
pub fn seal_record<T: Link>(record: &mut T, head: &mut Head) -> String {
    record.link(head.next_seq, head.prev_hash.clone());
    // Serializing a plain struct of strings, numbers and JSON values cannot
    // fail; an empty body would fail verification rather than pass it.
    let body = serde_json::to_string(record).unwrap_or_default();
    let hash = hex(&Sha256::digest(body.as_bytes()));
    let mut line = with_hash(body, &hash);
    line.push('\n');
    head.next_seq += 1;
    head.prev_hash = hash;
    line
}

/// `value` with the keys of every object inside it in sorted order (this
/// build's JSON maps keep insertion order).
pub fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        scalar => scalar,
    }
}

/// Seals a free-form record (any key order) as the next link after `head`:
/// returns its line (with the final newline) and advances `head`.
pub fn seal(mut record: Map<String, Value>, head: &mut Head) -> String {
    record.insert("seq".to_owned(), Value::from(head.next_seq));
    record.insert(
        "prev_hash".to_owned(),
        Value::String(head.prev_hash.clone()),
    );
    record.remove("hash");
    let body = body_of(&record);
    let hash = hex(&Sha256::digest(body.as_bytes()));
    let mut line = with_hash(body, &hash);
    line.push('\n');
    head.next_seq += 1;
    head.prev_hash = hash;
    line
}

/// The canonical encoding of `record` without `hash`.
fn body_of(record: &Map<String, Value>) -> String {
    let mut text = String::with_capacity(512);
    canonical_object(record.iter().filter(|(k, _)| *k != "hash"), &mut text);
    text
}

/// A record's line: its canonical body with `hash` appended as the last
/// member. Every line of a trail has exactly this form.
fn with_hash(mut body: String, hash: &str) -> String {
    if body.ends_with('}') {
        body.pop();
        if !body.ends_with('{') {
            body.push(',');
        }
        body.push_str("\"hash\":\"");
        body.push_str(hash);
        body.push_str("\"}");
    }
    body
}

/// `value` in the canonical encoding.
pub fn canonical_text(value: &Value) -> String {
    let mut out = String::new();
    canonical(value, &mut out);
    out
}

/// JSON with object keys sorted at every level and no whitespace.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => canonical_object(map.iter(), out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        // Scalars: serde_json's own encoding (it cannot fail for a Value).
        scalar => out.push_str(&serde_json::to_string(scalar).unwrap_or_default()),
    }
}

fn canonical_object<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut String) {
    let mut entries: Vec<(&String, &Value)> = entries.collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).unwrap_or_default());
        out.push(':');
        canonical(value, out);
    }
    out.push('}');
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The outcome of verifying a trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every record verifies.
    Intact(Summary),
    /// Every record verifies, but a file ends in a partial line: a crash
    /// in the middle of a write, not an edit.
    TornTail {
        summary: Summary,
        file: PathBuf,
        /// The last complete record before the partial line.
        after_seq: Option<u64>,
    },
    /// The chain is broken at this record.
    Broken {
        file: PathBuf,
        line: usize,
        /// The record's own `seq`, when it has one.
        seq: Option<u64>,
        problem: String,
        /// The last record before it, which verified (seq and hash): the
        /// anchor to verify the files after damage with.
        verified_to: Option<(u64, String)>,
    },
    /// Every record verifies, but the records do not reach an anchor.
    Unanchored {
        /// The anchor's seq.
        seq: u64,
        problem: String,
    },
}

/// What an intact trail holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The head: publish it elsewhere to anchor the trail.
    pub last_hash: Option<String>,
    /// The first record continues a chain whose start is not in the files
    /// (older files were removed): its `prev_hash` was taken on trust.
    pub starts_mid_chain: bool,
    /// Files before the newest that end in a partial record, each set aside
    /// (`.torn`) at a restart after a crash, with the last record before
    /// the partial one: the chain continues in the next file.
    pub torn_earlier: Vec<(PathBuf, Option<u64>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read `{}`: {source}", path.display())]
pub struct VerifyError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// A record's hash kept outside the trail (the `audit trail head` log
/// line's `seq` and `hash`, or the head an earlier `verify` printed): the
/// trail must hold that record with that hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:HASH`, as `verify` prints a head and the log records it.
    fn from_str(text: &str) -> Result<Self, String> {
        let (seq, hash) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}`: expected SEQ:HASH, e.g. 41:8e2c…"))?;
        let seq = seq
            .trim()
            .parse()
            .map_err(|_| format!("`{seq}`: the seq is not a whole number"))?;
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "`{hash}`: the hash is not 64 hex digits (a SHA-256)"
            ));
        }
        Ok(Self { seq, hash })
    }
}

/// Verifies `files` as one trail, in the order given (rotated files
/// first, oldest first, then the active one).
pub fn verify(files: &[PathBuf]) -> Result<Verdict, VerifyError> {
    verify_anchored(files, &[])
}

/// [`verify`], and every anchor must be a record of the trail with the
/// hash it gives (or, one before the first record, that record's
/// `prev_hash`). A trail rewritten from scratch fails at the anchor's
/// record; one cut from the end is `Unanchored`.
pub fn verify_anchored(files: &[PathBuf], anchors: &[Anchor]) -> Result<Verdict, VerifyError> {
    let verdict = walk(files, anchors)?;
    let summary = match &verdict {
        Verdict::Intact(summary) | Verdict::TornTail { summary, .. } => summary,
        Verdict::Broken { .. } | Verdict::Unanchored { .. } => return Ok(verdict),
    };
    // Anchors inside the records' range were checked on the way.
    let (first, last) = match (summary.first_seq, summary.last_seq) {
        (Some(first), Some(last)) => (first, last),
        _ => {
            return Ok(match anchors.first() {
                Some(a) => Verdict::Unanchored {
                    seq: a.seq,
                    problem: "the trail holds no records".to_owned(),
                },
                None => verdict,
            })
        }
    };
    for a in anchors {
        if a.seq > last {
            return Ok(Verdict::Unanchored {
                seq: a.seq,
                problem: format!(
                    "the trail ends at seq {last}, before the anchored record: records were cut \
                     from the end"
                ),
            });
        }
        if a.seq.saturating_add(1) < first {
            return Ok(Verdict::Unanchored {
                seq: a.seq,
                problem: format!(
                    "the files start at seq {first}, after the anchored record: give the older \
                     files to check it"
                ),
            });
        }
    }
    Ok(verdict)
}

fn walk(files: &[PathBuf], anchors: &[Anchor]) -> Result<Verdict, VerifyError> {
    let mut head: Option<Head> = None;
    let mut summary = Summary {
        records: 0,
        first_seq: None,
        last_seq: None,
        last_hash: None,
        starts_mid_chain: false,
        torn_earlier: Vec::new(),
    };
    for (file_index, path) in files.iter().enumerate() {
        let (text, not_utf8) = read(path)?;
        for (index, raw) in text.split_inclusive('\n').enumerate() {
            let line_no = index + 1;
            let Some(line) = raw.strip_suffix('\n') else {
                // A partial line is always the last piece of a file: a
                // write cut short by a crash. In the newest file that is
                // the trail's end; in an older one, the writer set the file
                // aside at restart (`.torn`) and the next file continues
                // the chain. Anywhere else leash never leaves one: it is
                // text added after a file's last record.
                if file_index + 1 == files.len() {
                    return Ok(Verdict::TornTail {
                        after_seq: summary.last_seq,
                        summary,
                        file: path.clone(),
                    });
                }
                if !set_aside(path, summary.last_seq) {
                    return Ok(Verdict::Broken {
                        file: path.clone(),
                        line: line_no,
                        seq: None,
                        problem: "a partial line after the last record of a file that is \
                                  neither the newest nor one leash set aside after that record \
                                  (`PATH.<its seq>.torn`): text was added to it"
                            .to_owned(),
                        verified_to: summary.last_seq.zip(summary.last_hash.clone()),
                    });
                }
                summary.torn_earlier.push((path.clone(), summary.last_seq));
                continue;
            };
            let verified_to = summary.last_seq.zip(summary.last_hash.clone());
            let broken = |seq: Option<u64>, problem: String| Verdict::Broken {
                file: path.clone(),
                line: line_no,
                seq,
                problem,
                verified_to: verified_to.clone(),
            };
            let record: Map<String, Value> = match serde_json::from_str(line) {
                Ok(Value::Object(map)) => map,
                _ => return Ok(broken(None, "not a JSON record".to_owned())),
            };
            let seq = record.get("seq").and_then(Value::as_u64);
            let (Some(claimed_seq), Some(prev), Some(hash)) = (
                seq,
                record.get("prev_hash").and_then(Value::as_str),
                record.get("hash").and_then(Value::as_str),
            ) else {
                return Ok(broken(seq, "missing seq, prev_hash or hash".to_owned()));
            };
            let body = body_of(&record);
            if hex(&Sha256::digest(body.as_bytes())) != hash {
                return Ok(broken(
                    seq,
                    "its hash does not match its content: the record was edited".to_owned(),
                ));
            }
            // Exactly the form leash writes: no duplicate keys, no added
            // whitespace, no reordering.
            if with_hash(body, hash) != line {
                return Ok(broken(
                    seq,
                    "the line is not in the canonical form leash writes".to_owned(),
                ));
            }
            match &head {
                None => {
                    if claimed_seq == 0 && prev != GENESIS {
                        return Ok(broken(
                            seq,
                            "the first record of a trail must link to the genesis hash".to_owned(),
                        ));
                    }
                    summary.starts_mid_chain = claimed_seq != 0;
                    summary.first_seq = Some(claimed_seq);
                    // Every anchor for that seq: two that disagree cannot
                    // both hold.
                    if let Some(a) = claimed_seq.checked_sub(1).and_then(|before| {
                        anchors.iter().find(|a| a.seq == before && a.hash != prev)
                    }) {
                        return Ok(broken(
                            seq,
                            format!(
                                "its prev_hash is not the anchored hash of seq {}: the trail \
                                 was rewritten",
                                a.seq
                            ),
                        ));
                    }
                }
                Some(expected) => {
                    if claimed_seq != expected.next_seq {
                        return Ok(broken(
                            seq,
                            format!(
                                "expected seq {}, found {claimed_seq}: a record was deleted, \
                                 inserted or moved",
                                expected.next_seq
                            ),
                        ));
                    }
                    if prev != expected.prev_hash {
                        return Ok(broken(
                            seq,
                            "its prev_hash is not the previous record's hash: a record \
                             before it was replaced"
                                .to_owned(),
                        ));
                    }
                }
            }
            if anchors
                .iter()
                .any(|a| a.seq == claimed_seq && a.hash != hash)
            {
                return Ok(broken(
                    seq,
                    "its hash is not the anchored one: the trail was rewritten".to_owned(),
                ));
            }
            let Some(next_seq) = claimed_seq.checked_add(1) else {
                return Ok(broken(
                    seq,
                    "its seq is the largest there is: no record can follow it".to_owned(),
                ));
            };
            head = Some(Head {
                next_seq,
                prev_hash: hash.to_owned(),
            });
            summary.records += 1;
            summary.last_seq = Some(claimed_seq);
            summary.last_hash = Some(hash.to_owned());
        }
        if let Some(line) = not_utf8 {
            return Ok(Verdict::Broken {
                file: path.clone(),
                line,
                seq: None,
                problem: "the line is not UTF-8".to_owned(),
                verified_to: summary.last_seq.zip(summary.last_hash.clone()),
            });
        }
    }
    Ok(Verdict::Intact(summary))
}

/// Whether `path` is named as leash names a file it set aside at start
/// after the record `last_seq` (0 before any): `PATH.<last_seq, 20
/// digits>.torn`, or `.torn2`, `.torn3`…
fn set_aside(path: &Path, last_seq: Option<u64>) -> bool {
    let seq = format!(".{:020}", last_seq.unwrap_or(0));
    path.file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.rsplit_once(".torn"))
        .is_some_and(|(stem, n)| stem.ends_with(&seq) && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The file's text, up to the line holding its first byte that is not
/// UTF-8 (leash writes none), and that line's number if there is one.
fn read(path: &Path) -> Result<(String, Option<usize>), VerifyError> {
    let bytes = std::fs::read(path).map_err(|source| VerifyError {
        path: path.to_owned(),
        source,
    })?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => (text, None),
        // The file ends inside a character (a write of `résumé` cut short
        // by a crash): the last line is partial, as when a cut falls
        // between characters; it is never parsed, so its replacement
        // character changes nothing.
        Err(e) if e.utf8_error().error_len().is_none() => {
            (String::from_utf8_lossy(e.as_bytes()).into_owned(), None)
        }
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let cut = bytes[..valid]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let prefix = String::from_utf8_lossy(&bytes[..cut]).into_owned();
            let bad_line = prefix.matches('\n').count() + 1;
            (prefix, Some(bad_line))
        }
    })
}

/// The head after the last complete record of `text` (a file's contents),
/// and whether the text ends in a partial line. A line is a record when it
/// is a JSON object with a `seq`, a `prev_hash` and a `hash` that is its
/// own, in the canonical form: a later line that is anything else (`{}`, a
/// record edited, one saved again with `\r\n`) is damage after the last
/// record, not the record itself.
pub fn head_of(text: &str) -> (Option<Head>, bool) {
    let torn = !text.is_empty() && !text.ends_with('\n');
    let head = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .rev()
        .find_map(|l| {
            let line = &l[..l.len() - 1];
            let record = serde_json::from_str::<Map<String, Value>>(line).ok()?;
            let hash = record.get("hash")?.as_str()?;
            record.get("prev_hash")?.as_str()?;
            let body = body_of(&record);
            // A line `verify` would refuse is not one to continue after:
            // its hash, and exactly the form leash writes (a line saved
            // again with a carriage return or a space still hashes right).
            if hex(&Sha256::digest(body.as_bytes())) != hash || with_hash(body, hash) != line {
                return None;
            }
            Some(Head {
                next_seq: record.get("seq")?.as_u64()?.checked_add(1)?,
                prev_hash: hash.to_owned(),
            })
        });
    (head, torn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sealed records from genesis, as leash writes them.
    fn two_records() -> (String, Head) {
        let mut head = Head::genesis();
        let mut text = String::new();
        for n in 0..2 {
            let mut record = Map::new();
            record.insert("n".to_owned(), Value::from(n));
            text.push_str(&seal(record, &mut head));
        }
        (text, head)
    }

    #[test]
    fn the_head_is_the_last_line_that_is_a_record_with_its_own_hash() {
        let (text, head) = two_records();
        assert_eq!(head_of(&text), (Some(head.clone()), false));
        // JSON that is not a record, a blank line, a record whose hash is
        // not its own, and one at the end of the seq range: all damage
        // after the last record, which stays the head.
        let forged = text
            .lines()
            .last()
            .map(|l| l.replace(r#""n":1"#, r#""n":7"#))
            .expect("a line");
        // Hashed as leash would, but with a seq nothing can follow.
        let mut record = Map::new();
        record.insert("prev_hash".to_owned(), Value::from(GENESIS));
        record.insert("seq".to_owned(), Value::from(u64::MAX));
        let body = body_of(&record);
        let last = with_hash(body.clone(), &hex(&Sha256::digest(body.as_bytes())));
        // Alone, it is a trail verify refuses rather than overflows on.
        let dir = tempfile::tempdir().expect("temp dir");
        let alone = dir.path().join("max.log");
        std::fs::write(&alone, format!("{last}\n")).expect("write");
        match verify(&[alone]).expect("reads") {
            Verdict::Broken { problem, .. } => assert!(problem.contains("largest"), "{problem}"),
            other => panic!("{other:?}"),
        }
        for damage in [
            "{}\n".to_owned(),
            "\n".to_owned(),
            forged + "\n",
            last + "\n",
        ] {
            assert_eq!(
                head_of(&format!("{text}{damage}")),
                (Some(head.clone()), false),
                "{damage:?}"
            );
        }
        // The last record saved again with `\r\n`, or with a space added:
        // its hash still holds, but `verify` refuses the line, so the head
        // is the record before it.
        let (first, _) = text.split_once('\n').expect("two lines");
        let mut after_first = Head::genesis();
        let mut record = Map::new();
        record.insert("n".to_owned(), Value::from(0));
        assert_eq!(seal(record, &mut after_first), format!("{first}\n"));
        let last = text.lines().last().expect("a line");
        for resaved in [format!("{last}\r\n"), last.replacen(',', ", ", 1) + "\n"] {
            assert_eq!(
                head_of(&format!("{first}\n{resaved}")),
                (Some(after_first.clone()), false),
                "{resaved:?}"
            );
        }
        // A partial line is torn; nothing at all is no head.
        assert_eq!(head_of(&format!("{text}{{\"seq\":2")), (Some(head), true));
        assert_eq!(head_of("{}\n"), (None, false));
    }

    /// Writes `text` as a one-file trail and verifies it.
    fn verified(text: &str) -> Verdict {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("trail.log");
        std::fs::write(&path, text).expect("write");
        verify(&[path]).expect("reads")
    }

    #[test]
    fn a_float_whose_shortest_form_reads_back_elsewhere_is_sealed_as_itself() {
        // With a best-effort float parser, this text parses to a float whose
        // shortest form (93415.43591337785) parses to its neighbour.
        let parsed: Value =
            serde_json::from_str(r#"{"amount_cents":93415.435913377863}"#).expect("JSON");
        let mut record = Map::new();
        record.insert("context".to_owned(), parsed);
        let mut head = Head::genesis();
        let line = seal(record, &mut head);
        assert_eq!(head_of(&line), (Some(head), false), "{line}");
        assert!(matches!(verified(&line), Verdict::Intact(_)), "{line}");
    }

    proptest::proptest! {
        /// Any number a caller puts in a recorded context key seals into a
        /// line that reads back as itself: a float whose shortest printed
        /// form parsed back to a neighbouring float made a clean trail fail
        /// as "edited" (and its head unreadable at restart).
        #[test]
        fn every_recorded_number_reads_back_as_sealed(bits in proptest::num::u64::ANY) {
            let number = f64::from_bits(bits);
            proptest::prop_assume!(number.is_finite());
            // As the service gets it: parsed from the caller's JSON text.
            let parsed: Value = serde_json::from_str(&format!("{{\"k\":{number:e}}}"))
                .expect("a finite number is JSON");
            let mut record = Map::new();
            record.insert("context".to_owned(), parsed);
            let mut head = Head::genesis();
            let line = seal(record, &mut head);
            proptest::prop_assert_eq!(head_of(&line), (Some(head), false), "{}", line);
            let verdict = verified(&line);
            proptest::prop_assert!(matches!(verdict, Verdict::Intact(_)), "{:?} {}", verdict, line);
        }
    }

    #[test]
    fn conflicting_anchors_for_one_record_fail_in_either_order() {
        let (text, head) = two_records();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("trail.log");
        std::fs::write(&path, &text).expect("write");
        let good = Anchor {
            seq: 1,
            hash: head.prev_hash.clone(),
        };
        let bad = Anchor {
            seq: 1,
            hash: "ab".repeat(32),
        };
        let files = [path];
        assert!(matches!(
            verify_anchored(&files, std::slice::from_ref(&good)).expect("reads"),
            Verdict::Intact(_)
        ));
        for anchors in [[good.clone(), bad.clone()], [bad, good]] {
            assert!(
                matches!(
                    verify_anchored(&files, &anchors).expect("reads"),
                    Verdict::Broken { seq: Some(1), .. }
                ),
                "{anchors:?}"
            );
        }
    }
}
