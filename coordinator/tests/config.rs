//! Property-based fuzzing of the coordinator's configuration: any text, and the reference
//! configuration with lines dropped, duplicated or changed, is parsed and validated or
//! refused with an error, never a panic.
//!
//! `make test` runs 2,000 cases per property; `make fuzz` sets `LOCKSTEP_FUZZ_CASES`.

use lockstep_coordinator::config::Config;
use proptest::collection::vec;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(lockstep_tests::fuzz_cases())
}

const REFERENCE: &str = include_str!("../../deploy/lockstep.example.toml");

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_a_configuration_or_an_error(text in "\\PC{0,400}") {
        let _ = Config::parse(&text);
    }

    #[test]
    fn the_reference_with_lines_changed_parses_or_is_refused(
        edits in vec((any::<prop::sample::Index>(), 0..3u8, "\\PC{0,30}"), 1..6),
    ) {
        let mut lines: Vec<String> = REFERENCE.lines().map(str::to_string).collect();
        for (at, kind, text) in edits {
            let at = at.index(lines.len());
            match kind {
                0 => {
                    lines.remove(at);
                }
                1 => {
                    let line = lines[at].clone();
                    lines.insert(at, line);
                }
                _ => lines[at] = text,
            }
            if lines.is_empty() {
                break;
            }
        }
        let _ = Config::parse(&lines.join("\n"));
    }
}
