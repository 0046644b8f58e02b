//! The README's library section opens with an axum app that adopts `handover` in at most 10
//! lines: this test takes that example out of README.md, checks that it is
//! `examples/hello_axum.rs` (which the build compiles: a README that drifts from code that
//! compiles fails here), counts the lines that are handover's, and checks the count the
//! README states.

use std::path::Path;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The section of `markdown` under the heading `heading`, to the next `## `.
fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let start = markdown
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has a {heading:?} section"));
    let body = &markdown[start + heading.len() + 2..];
    let end = body.find("\n## ").unwrap_or(body.len());
    &body[..end]
}

/// The first fenced block whose info string starts with `rust`, and the text before it.
fn first_rust_block(text: &str) -> (&str, &str) {
    let open = text.find("```rust").expect("a rust code block");
    let code_start = open + text[open..].find('\n').expect("a fence line") + 1;
    let len = text[code_start..].find("```").expect("a closing fence");
    (&text[..open], &text[code_start..code_start + len])
}

/// Lines of `code` that are handover's: code (not comment-only) lines that name it.
fn handover_lines(code: &str) -> Vec<&str> {
    code.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && l.contains("handover"))
        .collect()
}

/// The number in the first `**N lines**` of `text`.
fn stated_count(text: &str) -> usize {
    let at = text
        .find(" lines**")
        .expect("the README states `**N lines**`");
    let digits = text[..at].rsplit("**").next().expect("**N");
    digits
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{digits:?} is a number"))
}

#[test]
fn readme_axum_example_is_hello_axum_and_names_handover_in_at_most_10_lines() {
    let readme = read("README.md");
    let example = section(&readme, "## Example");
    let (before, code) = first_rust_block(example);
    assert!(
        !before.contains("```"),
        "the section opens with the axum example: no other code block before it"
    );
    assert!(
        code.contains("axum::"),
        "the first example is an axum app:\n{code}"
    );

    // The same as the example the build compiles (below its doc comment).
    let file = read("examples/hello_axum.rs");
    let file_code = &file[file.find("use ").expect("the example has code")..];
    assert_eq!(
        code, file_code,
        "README.md's first example is examples/hello_axum.rs"
    );

    let lines = handover_lines(code);
    eprintln!("the README's axum example: {} handover lines:", lines.len());
    for line in &lines {
        eprintln!("    {line}");
    }
    assert!(lines.len() <= 10, "at most 10 lines: {lines:#?}");
    assert_eq!(
        stated_count(before),
        lines.len(),
        "the count the README states is the count of the example"
    );
    // The counter is not vacuous: the same app without handover has none.
    let plain = "use axum::{routing::get, Router};\n\
                 let listener = tokio::net::TcpListener::bind(\"127.0.0.1:8080\").await?;\n\
                 // handover would go here\n\
                 axum::serve(listener, app).await?;\n";
    assert!(handover_lines(plain).is_empty());
}
