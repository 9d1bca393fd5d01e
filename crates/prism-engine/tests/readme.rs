//! The README's embedding example is `examples/embed.rs`, word for word: the example is built
//! by `cargo test` and run by the e2e suite, so the README's code cannot rot.

#[test]
fn the_readme_shows_the_embed_example_verbatim() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap_or_default();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/embed.rs"))
            .unwrap_or_default();
    // The README shows the example without its leading `//!` comment.
    let code: String = example
        .lines()
        .skip_while(|line| line.starts_with("//!"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(!code.trim().is_empty(), "examples/embed.rs is empty");
    let block = format!("```rust\n{code}```");
    assert!(
        readme.contains(&block),
        "README.md's embedding example differs from crates/prism-engine/examples/embed.rs; \
         paste the example (without its //! lines) into the README:\n{block}"
    );
}
