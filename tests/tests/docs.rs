//! The docs against the code, so that they cannot drift apart unnoticed:
//!
//! - every config key the parser accepts has a row in `docs/configuration.md`, and every row
//!   names a key it accepts, section by section; the keys come from the parser itself (serde's
//!   `deny_unknown_fields` error lists the fields a section expects), not from a list kept here;
//! - a default the docs give as a value is the default: writing it changes nothing;
//! - the configs the README and `docs/configuration.md` show, and `deploy/dsrlb.toml`, are valid;
//! - every `dsrlb` command (from `dsrlb --help`) and each of its options is in the CLI list of
//!   `docs/operations.md`, every option the docs give a `dsrlb` command is one it takes, and every
//!   command has a man page naming its options;
//! - the source layout in `docs/internals.md` names every source file, and only files that exist.
//! - every link between the README and the pages of `docs/` leads to a file and a heading there.
//!
//! A check that fails says what to add or remove, and where. None of this needs root; the CLI
//! checks need the `dsrlb` binary built (`cargo build -p lb-userspace`, which `cargo xtask test`
//! does first).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

/// A key no section accepts: the parser's error then lists the keys the section does accept.
const PROBE: &str = "zz_not_a_key";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The README and every page of `docs/`, relative to the root.
fn pages() -> Vec<String> {
    let mut out = vec!["README.md".to_owned()];
    for e in std::fs::read_dir(root().join("docs")).expect("docs/") {
        let path = e.expect("an entry").path();
        if path.extension().is_some_and(|x| x == "md") {
            out.push(format!("docs/{}", path.file_name().expect("a name").to_string_lossy()));
        }
    }
    out.sort();
    out
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---- what the parser accepts ----

/// How a section is written in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `[name]`, or `name = { ... }` inside another section.
    Table,
    /// `[[name]]`.
    Array,
}

/// The keys the parser accepts in the section that `text` puts [`PROBE`] in, read from the
/// error that names it ("unknown field `zz_not_a_key`, expected one of `a`, `b`, ..."); `None`
/// when `text` fails for another reason (the section is not one).
fn expected_keys(text: &str) -> Option<BTreeSet<String>> {
    let err = match lb_userspace::config::parse(text, "probe.toml") {
        Ok(_) => return None,
        Err(e) => e.to_string(),
    };
    let marker = format!("unknown field `{PROBE}`");
    let line = err.lines().find(|l| l.contains(&marker))?;
    let rest = &line[line.find(&marker)? + marker.len()..];
    // serde: "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, ...".
    let keys: BTreeSet<String> = rest.split('`').skip(1).step_by(2).map(str::to_owned).collect();
    assert!(!keys.is_empty(), "no expected keys in the parser's error: {err}");
    Some(keys)
}

/// A section the parser accepts: its path (`listener`, `listener.health`), its kind and keys.
#[derive(Debug)]
struct CodeSection {
    path: String,
    kind: Kind,
    keys: BTreeSet<String>,
}

/// Every section and key the parser accepts, found by probing: the top level, then each key
/// of a section tried as a table and as an array of tables (`[key]`, `[[key]]` at the top level;
/// `key = { ... }`, `key = [{ ... }]` inside a section).
fn code_schema() -> (BTreeSet<String>, Vec<CodeSection>) {
    let top = expected_keys(&format!("{PROBE} = 1\n")).expect("the top level refuses unknown keys");
    // (path, kind, the text before and after a probe placed in that section)
    let mut queue: Vec<(String, Kind, String, String)> = Vec::new();
    for key in &top {
        queue.push((key.clone(), Kind::Table, format!("[{key}]\n"), "\n".to_owned()));
        queue.push((key.clone(), Kind::Array, format!("[[{key}]]\n"), "\n".to_owned()));
    }
    let mut sections = Vec::new();
    while let Some((path, kind, before, after)) = queue.pop() {
        let Some(keys) = expected_keys(&format!("{before}{PROBE} = 1{after}")) else { continue };
        for key in &keys {
            queue.push((format!("{path}.{key}"), Kind::Table, format!("{before}{key} = {{ "), format!(" }}{after}")));
            queue.push((format!("{path}.{key}"), Kind::Array, format!("{before}{key} = [{{ "), format!(" }}]{after}")));
        }
        sections.push(CodeSection { path, kind, keys });
    }
    sections.sort_by(|a, b| a.path.cmp(&b.path));
    (top, sections)
}

// ---- what the docs say ----

/// The level, title and body of every heading of a Markdown page (fenced code included in the
/// bodies, as written).
fn headings(md: &str) -> Vec<(usize, String, String)> {
    let mut out: Vec<(usize, String, String)> = Vec::new();
    let mut fenced = false;
    for line in md.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let level = line.chars().take_while(|&c| c == '#').count();
        if !fenced && level > 0 && line[level..].starts_with(' ') {
            out.push((level, line[level + 1..].trim().to_owned(), String::new()));
        } else if let Some(last) = out.last_mut() {
            last.2.push_str(line);
            last.2.push('\n');
        }
    }
    out
}

/// The cells of each row of the Markdown tables in `body`, header and separator left out.
fn table_rows(body: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in body.lines() {
        let Some(inner) = line.trim().strip_prefix('|') else {
            in_table = false;
            continue;
        };
        let cells: Vec<String> = inner.trim_end_matches('|').split(" | ").map(|c| c.trim().to_owned()).collect();
        if !in_table {
            in_table = true; // the header
            continue;
        }
        if cells.iter().all(|c| c.chars().all(|ch| ch == '-' || ch == ' ')) {
            continue;
        }
        rows.push(cells);
    }
    rows
}

/// The first code span of `cell`.
fn first_code(cell: &str) -> Option<&str> {
    cell.split('`').nth(1)
}

/// A documented section of `docs/configuration.md`: its kind and its rows by key.
#[derive(Debug)]
struct DocSection {
    kind: Kind,
    rows: BTreeMap<String, Vec<String>>,
}

/// The reference tables of `docs/configuration.md`: "Top level" as "", and every heading that
/// names a section in a code span (`` `[health]` ``, `` `[[listener]]` ``).
fn doc_schema() -> BTreeMap<String, DocSection> {
    let md = read("docs/configuration.md");
    let mut out = BTreeMap::new();
    for (_, title, body) in headings(&md) {
        let (name, kind) = if title == "Top level" {
            (String::new(), Kind::Table)
        } else {
            match first_code(&title) {
                Some(s) if s.starts_with("[[") && s.ends_with("]]") => (s[2..s.len() - 2].to_owned(), Kind::Array),
                Some(s) if s.starts_with('[') && s.ends_with(']') => (s[1..s.len() - 1].to_owned(), Kind::Table),
                _ => continue,
            }
        };
        let mut rows = BTreeMap::new();
        for cells in table_rows(&body) {
            assert_eq!(
                cells.len(),
                5,
                "docs/configuration.md, section {title:?}: a row needs key, type, default, range, meaning: {cells:?}"
            );
            assert!(cells.iter().all(|c| !c.is_empty()), "docs/configuration.md, section {title:?}: an empty cell in {cells:?}");
            let key = first_code(&cells[0]).unwrap_or_else(|| panic!("section {title:?}: the key is not in a code span: {cells:?}"));
            assert!(rows.insert(key.to_owned(), cells.clone()).is_none(), "section {title:?}: {key} has two rows");
        }
        assert!(!rows.is_empty(), "docs/configuration.md, section {title:?} has no table");
        assert!(out.insert(name, DocSection { kind, rows }).is_none(), "docs/configuration.md documents {title:?} twice");
    }
    out
}

/// Where a section of the code is documented: under its own path, or, for a table nested in
/// another section (`listener.health`), under the section of its last name (`[health]`).
fn doc_for<'a>(docs: &'a BTreeMap<String, DocSection>, path: &str) -> Option<(&'a str, &'a DocSection)> {
    let last = path.rsplit('.').next().unwrap_or(path);
    docs.get_key_value(path).or_else(|| docs.get_key_value(last)).map(|(k, v)| (k.as_str(), v))
}

/// Differences between the keys the code accepts and the rows the docs have, both ways.
fn key_mismatches(top: &BTreeSet<String>, code: &[CodeSection], docs: &BTreeMap<String, DocSection>) -> Vec<String> {
    fn compare(problems: &mut Vec<String>, what: &str, accepted: &BTreeSet<String>, documented: &BTreeSet<String>) {
        for k in accepted.difference(documented) {
            problems.push(format!("{what}: `{k}` is accepted by the parser but has no row in docs/configuration.md"));
        }
        for k in documented.difference(accepted) {
            problems.push(format!("{what}: `{k}` has a row in docs/configuration.md but the parser refuses it"));
        }
    }
    let mut problems = Vec::new();
    // The top level: its keys that are sections are documented by a heading of their own.
    let top_sections: BTreeSet<String> = code.iter().filter(|s| !s.path.contains('.')).map(|s| s.path.clone()).collect();
    let top_scalars: BTreeSet<String> = top.difference(&top_sections).cloned().collect();
    let doc_top = docs.get("").map(|d| d.rows.keys().cloned().collect()).unwrap_or_default();
    compare(&mut problems, "top level", &top_scalars, &doc_top);
    let doc_sections: BTreeSet<String> = docs.keys().filter(|k| !k.is_empty()).cloned().collect();
    for s in top_sections.difference(&doc_sections) {
        problems.push(format!("section [{s}] is accepted by the parser but has no heading in docs/configuration.md"));
    }
    for s in code {
        match doc_for(docs, &s.path) {
            None => {}
            Some((name, d)) => {
                if !s.path.contains('.') && d.kind != s.kind {
                    problems.push(format!("section {}: written as {:?} in the docs, {:?} in the code", s.path, d.kind, s.kind));
                }
                compare(&mut problems, &format!("section {} (documented as [{name}])", s.path), &s.keys, &d.rows.keys().cloned().collect());
            }
        }
    }
    for name in doc_sections.iter().filter(|n| !top_sections.contains(*n) && !code.iter().any(|s| s.path.ends_with(&format!(".{n}")))) {
        problems.push(format!("docs/configuration.md documents section [{name}], which the parser does not accept"));
    }
    problems
}

#[test]
fn every_config_key_has_a_row_in_the_docs_and_every_row_a_key() {
    let (top, code) = code_schema();
    // The probing itself must have found the sections, or the comparison below proves nothing.
    assert!(code.len() >= 5, "found only these sections by probing the parser: {code:?}");
    let docs = doc_schema();
    let problems = key_mismatches(&top, &code, &docs);
    assert!(problems.is_empty(), "docs/configuration.md and the config parser disagree:\n  {}", problems.join("\n  "));
}

/// The comparison fails for a key added to the code without a row, and for a row of a key the
/// code does not take (the same function as above, fed a changed schema).
#[test]
fn the_key_check_fails_on_a_missing_or_an_extra_row() {
    let (top, code) = code_schema();
    let mut docs = doc_schema();
    assert!(key_mismatches(&top, &code, &docs).is_empty());
    let listener = docs.get_mut("listener").expect("[[listener]] documented");
    let row = listener.rows.remove("max_conn_burst").expect("a row for max_conn_burst");
    let problems = key_mismatches(&top, &code, &docs);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("`max_conn_burst` is accepted by the parser but has no row"), "{problems:?}");
    let listener = docs.get_mut("listener").expect("[[listener]] documented");
    listener.rows.insert("max_conn_burst".to_owned(), row);
    docs.get_mut("cluster").expect("[cluster] documented").rows.insert("gossip".to_owned(), Vec::new());
    let problems = key_mismatches(&top, &code, &docs);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("`gossip` has a row in docs/configuration.md but the parser refuses it"), "{problems:?}");
}

/// A config with every section, each holding its required keys and `extra[section]`.
fn config_with(extra: &BTreeMap<&str, String>, key_file: &Path) -> String {
    let x = |s: &str| extra.get(s).cloned().unwrap_or_default();
    format!(
        "interface = \"eth0\"\n{}\n[health]\n{}\n[[listener]]\nname = \"mqtt\"\nvip = \"192.0.2.100\"\nport = 1883\n{}\n\
         [[backend]]\nname = \"b1\"\naddress = \"192.0.2.11\"\n{}\n[announce]\n{}\n\
         [cluster]\nnodes = [\"192.0.2.2:9878\", \"192.0.2.3:9878\"]\nkey_file = \"{}\"\n{}\n",
        x(""),
        x("health"),
        x("listener"),
        x("backend"),
        x("announce"),
        key_file.display(),
        x("cluster")
    )
}

/// A key file the cluster section can name: this user's, mode 0600; removed when dropped.
struct KeyFile(PathBuf);

impl KeyFile {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::env::temp_dir().join(format!("dsrlb-docs-test-{}.key", std::process::id()));
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("writing a key file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
        Self(path)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

#[test]
fn the_documented_defaults_are_the_defaults() {
    let docs = doc_schema();
    let key = KeyFile::new();
    let parse = |extra: &BTreeMap<&str, String>| {
        let text = config_with(extra, &key.0);
        lb_userspace::config::parse(&text, "defaults.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let base = parse(&BTreeMap::new());
    let mut checked = 0;
    for (section, doc) in &docs {
        for (k, cells) in &doc.rows {
            // A default given as one value (`"30m"`, `3`, `[]`): write it, nothing may change.
            let default = &cells[2];
            let Some(value) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')).filter(|v| !v.contains('`')) else {
                continue;
            };
            let extra = BTreeMap::from([(section.as_str(), format!("{k} = {value}"))]);
            let with = parse(&extra);
            assert!(with == base, "docs/configuration.md: [{section}] {k}'s default is {default}, but writing it changes the config");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} defaults were checked");
}

/// The ```toml blocks of `file` that are whole configs (they set `interface`).
fn whole_configs(file: &str) -> Vec<String> {
    let md = read(file);
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in md.lines() {
        match &mut block {
            None if line.starts_with("```toml") => block = Some(String::new()),
            Some(b) if line.starts_with("```") => {
                if b.lines().any(|l| l.starts_with("interface =")) {
                    out.push(std::mem::take(b));
                }
                block = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn the_configs_the_docs_show_are_valid() {
    let mut n = 0;
    for file in ["README.md", "docs/configuration.md"] {
        for text in whole_configs(file) {
            if let Err(e) = lb_userspace::config::parse(&text, file) {
                panic!("a config in {file} is refused: {e}\n{text}");
            }
            n += 1;
        }
    }
    assert!(n >= 2, "found {n} whole configs in the README and docs/configuration.md");
    let shipped = read("deploy/dsrlb.toml");
    lb_userspace::config::parse(&shipped, "deploy/dsrlb.toml").unwrap_or_else(|e| panic!("{e}"));
}

// ---- the CLI ----

fn dsrlb(args: &[&str]) -> String {
    let out = Command::new(tests::dsrlb_bin()).args(args).output().expect("running dsrlb");
    assert!(out.status.success(), "dsrlb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The entries of a `--help` section ("Commands:", "Options:"): the lines indented by two.
fn help_section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| (l.starts_with("  ") && !l.starts_with("   ")) || l.trim_start().starts_with('-'))
        .collect()
}

/// The long options in `text` (`--name`), aliases included.
fn long_options(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let name: String = text[i + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        let before = text[..i].chars().next_back();
        if !name.is_empty() && !name.starts_with('-') && before.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '-') {
            out.insert(format!("--{name}"));
        }
    }
    out
}

/// Each `dsrlb` command with its long options (the global ones included), from `--help`.
fn cli() -> BTreeMap<String, BTreeSet<String>> {
    let help = dsrlb(&["--help"]);
    let mut out = BTreeMap::new();
    for line in help_section(&help, "Commands:") {
        let name = line.split_whitespace().next().expect("a command name");
        if name == "help" {
            continue;
        }
        let sub = dsrlb(&[name, "--help"]);
        // A command of commands (`dsrlb decap`): each of its commands, as `decap attach`.
        let nested: Vec<String> = help_section(&sub, "Commands:")
            .iter()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| *n != "help")
            .map(str::to_owned)
            .collect();
        if nested.is_empty() {
            out.insert(name.to_owned(), options(&sub));
        }
        for n in nested {
            out.insert(format!("{name} {n}"), options(&dsrlb(&[name, &n, "--help"])));
        }
    }
    assert!(out.len() >= 10, "dsrlb --help lists only {:?}", out.keys());
    out
}

/// The long options a command's `--help` lists, with their aliases, but not `--help`.
fn options(help: &str) -> BTreeSet<String> {
    let mut opts: BTreeSet<String> = help_section(help, "Options:")
        .iter()
        // The option itself and its aliases, not the options its description mentions.
        .flat_map(|l| {
            let spec = l.trim_start().split("  ").next().unwrap_or("");
            let aliases = l.rfind("[alias").map_or("", |i| &l[i..]);
            long_options(spec).into_iter().chain(long_options(aliases))
        })
        .collect();
    opts.remove("--help");
    opts
}

/// The body of `## title` in `md`.
fn section<'a>(md: &'a str, title: &str) -> &'a str {
    let start = md.find(&format!("\n## {title}\n")).unwrap_or_else(|| panic!("no section {title:?}"));
    let body = &md[start + title.len() + 5..];
    &body[..body.find("\n## ").unwrap_or(body.len())]
}

#[test]
fn every_command_and_option_is_in_the_cli_list_and_the_man_pages() {
    let cli = cli();
    let ops = read("docs/operations.md");
    let list = section(&ops, "The CLI");
    let mut problems = Vec::new();
    for (cmd, opts) in &cli {
        if !list.lines().any(|l| l.starts_with(&format!("dsrlb {cmd}"))) {
            problems.push(format!("`dsrlb {cmd}` has no line in the CLI list of docs/operations.md"));
        }
        for o in opts.iter().filter(|o| !list.contains(o.as_str())) {
            problems.push(format!("`dsrlb {cmd} {o}` is not in the CLI list of docs/operations.md"));
        }
    }
    // The man pages come from the same definitions: one per command, naming its options.
    let dir = std::env::temp_dir().join(format!("dsrlb-docs-man-{}", std::process::id()));
    dsrlb(&["man", "--dir", dir.to_str().expect("UTF-8 path")]);
    for (cmd, opts) in &cli {
        let page = std::fs::read_to_string(dir.join(format!("dsrlb-{}.1", cmd.replace(' ', "-")))).unwrap_or_default();
        for o in opts.iter().filter(|o| !page.contains(&o.replace('-', "\\-"))) {
            if *o != "--write" {
                problems.push(format!("man page dsrlb-{cmd}.1 does not name {o}"));
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(problems.is_empty(), "the CLI and its docs disagree:\n  {}", problems.join("\n  "));
}

/// Where the docs show `dsrlb COMMAND ...`: a code span that starts with it, or a line of a code
/// block that does (after a `$ ` or `# ` prompt); the command, and the rest up to a comment, a
/// pipe or a `;`. In a code block, a line of options (`  --metrics ADDR`, `[--json]`) belongs
/// to the command above it, or to none (the global options) after a line of prose.
fn shown_commands(md: &str) -> Vec<(String, String)> {
    fn command(text: &str) -> Option<(String, String)> {
        let text = text.trim_start();
        let text = text.strip_prefix("$ ").or_else(|| text.strip_prefix("# ")).unwrap_or(text);
        let rest = text.strip_prefix("dsrlb ")?;
        let mut cmd: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
        // A second lowercase word may be a command of a command (`dsrlb decap attach`), or an
        // argument (`dsrlb drain b1`): the caller tells them apart.
        if let Some(next) = rest[cmd.len()..].strip_prefix(' ') {
            let word: String = next.chars().take_while(char::is_ascii_lowercase).collect();
            if !word.is_empty() && next[word.len()..].chars().next().is_none_or(|c| c == ' ') {
                cmd = format!("{cmd} {word}");
            }
        }
        let tail = rest[cmd.len()..].split(['#', '|', ';']).next().unwrap_or("");
        Some((cmd, tail.to_owned()))
    }
    let mut out = Vec::new();
    let mut fenced = false;
    let mut current: Option<String> = None;
    for line in md.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            current = None;
        } else if fenced {
            let trimmed = line.trim_start();
            if trimmed.starts_with("--") || trimmed.starts_with("[--") {
                if let Some(cmd) = &current {
                    out.push((cmd.clone(), trimmed.split("  ").next().unwrap_or("").to_owned()));
                }
            } else if let Some((cmd, tail)) = command(line) {
                current = Some(cmd.clone());
                out.push((cmd, tail));
            } else if !line.starts_with(' ') {
                current = Some(String::new());
            }
        } else {
            out.extend(line.split('`').skip(1).step_by(2).filter_map(command));
        }
    }
    out
}

#[test]
fn the_docs_show_only_commands_and_options_dsrlb_has() {
    let cli = cli();
    let global: BTreeSet<String> = long_options(&help_section(&dsrlb(&["--help"]), "Options:").join("\n"));
    let every: BTreeSet<&String> = cli.values().flatten().collect();
    let mut problems = Vec::new();
    let files = pages();
    let mut seen = 0;
    for file in &files {
        let md = read(file);
        for (cmd, tail) in shown_commands(&md) {
            // Two words: a command of commands (`decap attach`), or a command and its argument.
            let (cmd, tail) = match cmd.split_once(' ') {
                Some((first, word)) if !cli.contains_key(&cmd) => (first.to_owned(), format!(" {word}{tail}")),
                _ => (cmd, tail),
            };
            let group = cli.keys().any(|k| k.starts_with(&format!("{cmd} ")));
            let opts = if cmd.is_empty() || cmd == "help" || group {
                &global
            } else if let Some(o) = cli.get(&cmd) {
                o
            } else {
                problems.push(format!("{file}: `dsrlb {cmd}` is no dsrlb command"));
                continue;
            };
            for o in long_options(&tail).iter().filter(|o| !opts.contains(*o)) {
                problems.push(format!("{file}: `dsrlb {cmd}` has no option {o} (shown as `dsrlb {cmd}{tail}`)"));
            }
            seen += 1;
        }
        // An option on its own in code (`--socket-group`) is one of some command.
        for span in md.split("```").step_by(2).flat_map(|prose| prose.split('`').skip(1).step_by(2)) {
            if span.starts_with("--") {
                for o in long_options(span).iter().filter(|o| !every.contains(o)) {
                    problems.push(format!("{file}: `{span}` names {o}, which no dsrlb command takes"));
                }
            }
        }
    }
    assert!(seen >= 20, "found only {seen} dsrlb commands shown in the docs");
    assert!(problems.is_empty(), "the docs show what dsrlb does not have:\n  {}", problems.join("\n  "));
}

// ---- the source layout ----

/// The source files of the workspace's crates: `*.rs` under each crate's `src/` and `tests/`,
/// and build scripts.
fn source_files() -> BTreeSet<String> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.insert(p.strip_prefix(base).expect("under the root").display().to_string());
            }
        }
    }
    let root = root();
    let mut out = BTreeSet::new();
    for krate in ["lb-common", "lb-ebpf", "lb-userspace", "tests", "xtask"] {
        for sub in ["src", "tests"] {
            walk(&root.join(krate).join(sub), &root, &mut out);
        }
        let build = root.join(krate).join("build.rs");
        if build.exists() {
            out.insert(format!("{krate}/build.rs"));
        }
    }
    out
}

#[test]
fn the_source_layout_names_every_source_file() {
    let md = read("docs/internals.md");
    let layout = section(&md, "Source layout");
    let documented: BTreeSet<String> = table_rows(layout)
        .iter()
        .filter_map(|r| first_code(&r[0]).map(str::to_owned))
        .filter(|p| Path::new(p).extension().is_some_and(|x| x == "rs"))
        .collect();
    let files = source_files();
    assert!(files.len() > 50, "found only {} source files", files.len());
    let missing: Vec<&String> = files.difference(&documented).collect();
    let gone: Vec<&String> = documented.difference(&files).collect();
    assert!(
        missing.is_empty() && gone.is_empty(),
        "docs/internals.md's source layout is stale: add a row for {missing:?}; remove or rename the rows of {gone:?}"
    );
}

// ---- links ----

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`.
fn anchor(title: &str) -> String {
    title
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_link_between_the_pages_resolves() {
    let pages = pages();
    let mut problems = Vec::new();
    let mut links = 0;
    for page in &pages {
        let md = read(page);
        let prose: String = md.split("```").step_by(2).collect::<Vec<_>>().join("\n");
        for (i, _) in prose.match_indices("](") {
            let target: String = prose[i + 2..].chars().take_while(|&c| c != ')' && !c.is_whitespace()).collect();
            if target.starts_with("http") {
                continue;
            }
            links += 1;
            let (file, frag) = target.split_once('#').unwrap_or((&target, ""));
            let dir = Path::new(page).parent().unwrap_or(Path::new(""));
            let path = if file.is_empty() { PathBuf::from(page) } else { dir.join(file) };
            let Ok(text) = std::fs::read_to_string(root().join(&path)) else {
                problems.push(format!("{page}: ({target}): no file {}", path.display()));
                continue;
            };
            if !frag.is_empty() && !headings(&text).iter().any(|(_, t, _)| anchor(t) == frag) {
                problems.push(format!("{page}: ({target}): {} has no heading #{frag}", path.display()));
            }
        }
    }
    assert!(links > 50, "found only {links} links");
    assert!(problems.is_empty(), "broken links:\n  {}", problems.join("\n  "));
}
