//! The scripted conversation that both model fixtures play back.
//!
//! A script is a list of turns. The fixture picks the turn from the conversation it
//! receives, not from a request counter: turn `n` answers a request whose history already
//! holds `n` tool results. A client that retries, or sends a side request, therefore gets
//! the same answer again instead of skipping ahead.
//!
//! A resumed conversation (`claude --continue`, `codex exec resume`) carries the earlier
//! turns and then a new prompt; it gets the next turn, not the last one again. Each prompt
//! that follows an assistant reply counts as one more turn done (see [`turn_index`]).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// One answer of the scripted model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// Ask the client to write `content` to `path` with its own file-writing tool.
    ///
    /// A relative `path` is resolved against the client's working directory when the tool
    /// needs an absolute path (claude's `Write`).
    WriteFile { path: String, content: String },
    /// Ask the client to run a shell command.
    Shell { command: String },
    /// Answer with text and end the turn (`end_turn`, or an assistant message).
    Text(String),
    /// Call the tool `name` with `input`, exactly as given: an MCP tool is named as the
    /// client names it (Claude Code: `mcp__<server>__<tool>`). When the request does not
    /// offer a tool of that name, the fixture answers with a text turn that says so, so a
    /// test fails on it instead of quietly going on.
    Tool { name: String, input: Value },
}

/// A list of turns; the last one is repeated for any later request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    turns: Vec<Turn>,
}

impl Script {
    /// A script of the given turns. An empty list behaves like `[Text("done")]`.
    #[must_use]
    pub fn new(turns: Vec<Turn>) -> Self {
        Self { turns }
    }

    /// The usual smoke conversation: write one file, then say `done`.
    #[must_use]
    pub fn write_then_done(path: impl Into<String>, content: impl Into<String>) -> Self {
        Self::new(vec![
            Turn::WriteFile {
                path: path.into(),
                content: content.into(),
            },
            Turn::Text("done".to_owned()),
        ])
    }

    /// The turns, in order.
    #[must_use]
    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// The text of the last text turn (`done` when there is none): what a side request
    /// without tools gets.
    #[must_use]
    pub fn final_text(&self) -> String {
        self.turns
            .iter()
            .rev()
            .find_map(|turn| match turn {
                Turn::Text(text) => Some(text.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "done".to_owned())
    }

    /// The turn at `index` (see [`turn_index`]); the last turn for any later index.
    #[must_use]
    pub fn turn_for(&self, index: usize) -> Turn {
        match self.turns.get(index).or_else(|| self.turns.last()) {
            Some(turn) => turn.clone(),
            None => Turn::Text("done".to_owned()),
        }
    }
}

/// Which turn answers a conversation with `tool_results` tool results and
/// `resumed_prompts` user prompts after the first assistant reply.
///
/// Every tool result is one turn done. A conversation starts with one prompt, which
/// answers to turn 0; each later prompt (a resumed CLI appends one) means the turn
/// before it ended, so it counts as one more. That is "tool results + prompts - 1",
/// with prompts counted only once the model has replied, because clients also send
/// context as user messages before the real prompt (codex's `<environment_context>`,
/// the AGENTS.md instructions).
#[must_use]
pub fn turn_index(tool_results: usize, resumed_prompts: usize) -> usize {
    tool_results + resumed_prompts
}

/// Whether a user text is context the client added rather than a prompt someone wrote:
/// one wholly tag-wrapped block (`<system-reminder>…</system-reminder>`,
/// `<environment_context>…</environment_context>`) or codex's AGENTS.md instructions.
pub(crate) fn is_context_text(text: &str) -> bool {
    let text = text.trim();
    text.is_empty()
        || (text.starts_with('<') && text.ends_with('>'))
        || text.starts_with("# AGENTS.md instructions")
}

/// The text a fixture answers with when the script calls a tool the request does not
/// offer.
pub(crate) fn unoffered_tool(name: &str, tools: &[String]) -> String {
    format!(
        "fixture: the script calls tool `{name}`, which this request does not offer (offered: {})",
        tools.join(", ")
    )
}

/// A tool call resolved against the tools a client offered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolCall {
    pub name: String,
    pub input: Value,
}

/// Quotes `text` for a POSIX shell.
pub(crate) fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A shell command that writes `content` to `path` byte for byte.
pub(crate) fn write_command(path: &str, content: &str) -> String {
    format!(
        "printf '%s' {} > {}",
        shell_quote(content),
        shell_quote(path)
    )
}

/// The names of the tools in a request's `tools` array.
///
/// Anthropic and the Responses API both put `name` at the top level of each tool; the
/// Chat Completions shape nests it under `function`, which is accepted too.
pub(crate) fn tool_names(body: &Value) -> Vec<String> {
    let Some(tools) = body.get("tools").and_then(Value::as_array) else {
        return Vec::new();
    };
    let name = |tool: &Value| {
        tool.get("name")
            .or_else(|| tool.get("function").and_then(|f| f.get("name")))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut names = Vec::new();
    for tool in tools {
        let Some(outer) = name(tool) else { continue };
        // A Responses API namespace (codex groups each MCP server's tools in one, e.g.
        // `mcp__forge`): its tools are offered as `<namespace>__<tool>`.
        if let Some(inner) = tool.get("tools").and_then(Value::as_array) {
            names.extend(
                inner
                    .iter()
                    .filter_map(name)
                    .map(|t| format!("{outer}__{t}")),
            );
        }
        names.push(outer);
    }
    names
}

/// The namespace and tool a `<namespace>__<tool>` name stands for, when the request
/// offers that namespace with that tool.
pub(crate) fn namespaced(body: &Value, qualified: &str) -> Option<(String, String)> {
    let tools = body.get("tools").and_then(Value::as_array)?;
    tools.iter().find_map(|tool| {
        let namespace = tool.get("name").and_then(Value::as_str)?;
        let rest = qualified.strip_prefix(namespace)?.strip_prefix("__")?;
        let inner = tool.get("tools").and_then(Value::as_array)?;
        inner
            .iter()
            .any(|t| t.get("name").and_then(Value::as_str) == Some(rest))
            .then(|| (namespace.to_owned(), rest.to_owned()))
    })
}

/// Finds the client's working directory in the text it sent.
///
/// Claude Code states it in its environment block (`Working directory: /…` or
/// `Primary working directory: /…`), either in `system` or in a trailing system message.
pub(crate) fn working_directory(body: &Value) -> Option<PathBuf> {
    let mut found = None;
    visit_strings(body, &mut |text| {
        if found.is_some() {
            return;
        }
        for line in text.lines() {
            let line = line.trim_start_matches(['-', '*', ' ']);
            for prefix in ["Primary working directory:", "Working directory:"] {
                if let Some(rest) = line.strip_prefix(prefix) {
                    let dir = rest.trim();
                    if dir.starts_with('/') {
                        found = Some(PathBuf::from(dir));
                        return;
                    }
                }
            }
        }
    });
    found
}

fn visit_strings(value: &Value, visit: &mut dyn FnMut(&str)) {
    match value {
        Value::String(text) => visit(text),
        Value::Array(items) => items.iter().for_each(|item| visit_strings(item, visit)),
        Value::Object(map) => map.values().for_each(|item| visit_strings(item, visit)),
        _ => {}
    }
}

fn absolute(path: &str, cwd: Option<&Path>) -> Result<String, String> {
    if Path::new(path).is_absolute() {
        return Ok(path.to_owned());
    }
    match cwd {
        Some(dir) => Ok(dir.join(path).to_string_lossy().into_owned()),
        None => Err(format!(
            "`Write` needs an absolute path and no working directory is known for `{path}`"
        )),
    }
}

pub(crate) fn has(tools: &[String], name: &str) -> bool {
    tools.iter().any(|tool| tool == name)
}

/// Resolves a tool turn for an Anthropic Messages client.
///
/// claude offers `Write {file_path, content}` and `Bash {command}`; pi offers
/// `write {path, content}` and `bash {command}`. The case of the name tells them apart.
pub(crate) fn anthropic_tool_call(
    turn: &Turn,
    tools: &[String],
    cwd: Option<&Path>,
) -> Result<ToolCall, String> {
    let shell = |command: String| {
        ["Bash", "bash"]
            .into_iter()
            .find(|name| has(tools, name))
            .map(|name| ToolCall {
                name: name.to_owned(),
                input: json!({ "command": command }),
            })
    };
    match turn {
        Turn::WriteFile { path, content } => {
            if has(tools, "Write") {
                return Ok(ToolCall {
                    name: "Write".to_owned(),
                    input: json!({ "file_path": absolute(path, cwd)?, "content": content }),
                });
            }
            if has(tools, "write") {
                return Ok(ToolCall {
                    name: "write".to_owned(),
                    input: json!({ "path": path, "content": content }),
                });
            }
            shell(write_command(path, content)).ok_or_else(|| missing("Write", tools))
        }
        Turn::Shell { command } => shell(command.clone()).ok_or_else(|| missing("Bash", tools)),
        Turn::Tool { name, input } => named_call(name, input, tools),
        Turn::Text(_) => Err("a text turn is not a tool call".to_owned()),
    }
}

fn named_call(name: &str, input: &Value, tools: &[String]) -> Result<ToolCall, String> {
    if has(tools, name) {
        Ok(ToolCall {
            name: name.to_owned(),
            input: input.clone(),
        })
    } else {
        Err(unoffered_tool(name, tools))
    }
}

/// Resolves a tool turn for an OpenAI Responses client (codex).
///
/// With a model id it does not know, codex offers plain function tools, among them
/// `exec_command {cmd}`; older builds offered `shell {command: [argv]}`.
pub(crate) fn openai_tool_call(turn: &Turn, tools: &[String]) -> Result<ToolCall, String> {
    let command = match turn {
        Turn::WriteFile { path, content } => write_command(path, content),
        Turn::Shell { command } => command.clone(),
        Turn::Tool { name, input } => return named_call(name, input, tools),
        Turn::Text(_) => return Err("a text turn is not a tool call".to_owned()),
    };
    if has(tools, "exec_command") {
        return Ok(ToolCall {
            name: "exec_command".to_owned(),
            input: json!({ "cmd": command }),
        });
    }
    if has(tools, "shell_command") {
        return Ok(ToolCall {
            name: "shell_command".to_owned(),
            input: json!({ "command": command }),
        });
    }
    if has(tools, "shell") {
        return Ok(ToolCall {
            name: "shell".to_owned(),
            input: json!({ "command": ["bash", "-lc", command] }),
        });
    }
    Err(missing("exec_command", tools))
}

fn missing(wanted: &str, tools: &[String]) -> String {
    format!(
        "the request offers no `{wanted}`-like tool (offered: {})",
        tools.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_for_follows_tool_results_and_repeats_the_last() {
        let script = Script::write_then_done("hello.txt", "hi");
        assert_eq!(
            script.turn_for(0),
            Turn::WriteFile {
                path: "hello.txt".to_owned(),
                content: "hi".to_owned()
            }
        );
        assert_eq!(script.turn_for(1), Turn::Text("done".to_owned()));
        assert_eq!(script.turn_for(7), Turn::Text("done".to_owned()));
        assert_eq!(
            Script::new(vec![]).turn_for(0),
            Turn::Text("done".to_owned())
        );
    }

    #[test]
    fn final_text_is_the_last_text_turn() {
        let script = Script::new(vec![
            Turn::Text("first".to_owned()),
            Turn::Shell {
                command: "true".to_owned(),
            },
            Turn::Text("last".to_owned()),
        ]);
        assert_eq!(script.final_text(), "last");
        assert_eq!(Script::new(vec![]).final_text(), "done");
    }

    #[test]
    fn write_command_survives_quotes() {
        assert_eq!(
            write_command("a b.txt", "it's"),
            r"printf '%s' 'it'\''s' > 'a b.txt'"
        );
    }

    #[test]
    fn claude_gets_write_with_an_absolute_path() {
        let turn = Turn::WriteFile {
            path: "hello.txt".to_owned(),
            content: "hi".to_owned(),
        };
        let tools = vec!["Bash".to_owned(), "Write".to_owned()];
        let call = anthropic_tool_call(&turn, &tools, Some(Path::new("/work/ws"))).unwrap();
        assert_eq!(
            call,
            ToolCall {
                name: "Write".to_owned(),
                input: json!({"file_path": "/work/ws/hello.txt", "content": "hi"})
            }
        );
        assert!(anthropic_tool_call(&turn, &tools, None).is_err());
    }

    #[test]
    fn pi_gets_lowercase_write_with_the_path_as_given() {
        let turn = Turn::WriteFile {
            path: "hello.txt".to_owned(),
            content: "hi".to_owned(),
        };
        let tools = vec!["read".to_owned(), "bash".to_owned(), "write".to_owned()];
        let call = anthropic_tool_call(&turn, &tools, None).unwrap();
        assert_eq!(
            call,
            ToolCall {
                name: "write".to_owned(),
                input: json!({"path": "hello.txt", "content": "hi"})
            }
        );
    }

    #[test]
    fn falls_back_to_a_shell_and_fails_without_one() {
        let turn = Turn::WriteFile {
            path: "x".to_owned(),
            content: "y".to_owned(),
        };
        let call = anthropic_tool_call(&turn, &["bash".to_owned()], None).unwrap();
        assert_eq!(call.name, "bash");
        assert_eq!(call.input, json!({"command": "printf '%s' 'y' > 'x'"}));
        let err = anthropic_tool_call(&turn, &["read".to_owned()], None).unwrap_err();
        assert_eq!(
            err,
            "the request offers no `Write`-like tool (offered: read)"
        );
    }

    #[test]
    fn codex_gets_exec_command() {
        let turn = Turn::WriteFile {
            path: "hello.txt".to_owned(),
            content: "hi".to_owned(),
        };
        let call = openai_tool_call(&turn, &["exec_command".to_owned()]).unwrap();
        assert_eq!(
            call,
            ToolCall {
                name: "exec_command".to_owned(),
                input: json!({"cmd": "printf '%s' 'hi' > 'hello.txt'"})
            }
        );
        assert!(openai_tool_call(&turn, &[]).is_err());
    }

    #[test]
    fn finds_claude_working_directory() {
        let body = json!({
            "system": [{"type": "text", "text": "x"}],
            "messages": [
                {"role": "user", "content": "write"},
                {"role": "system", "content": "<env>\nPrimary working directory: /home/u/ws\nIs a git repo: no\n</env>"}
            ]
        });
        assert_eq!(working_directory(&body), Some(PathBuf::from("/home/u/ws")));
        assert_eq!(
            working_directory(&json!({"system": "Working directory: relative"})),
            None
        );
    }

    #[test]
    fn a_tool_turn_calls_exactly_the_named_tool_or_says_it_is_missing() {
        let turn = Turn::Tool {
            name: "mcp__forge__signal_done".to_owned(),
            input: json!({"status": "done", "summary": "ok"}),
        };
        let tools = vec!["Bash".to_owned(), "mcp__forge__signal_done".to_owned()];
        let expected = ToolCall {
            name: "mcp__forge__signal_done".to_owned(),
            input: json!({"status": "done", "summary": "ok"}),
        };
        assert_eq!(anthropic_tool_call(&turn, &tools, None).unwrap(), expected);
        assert_eq!(openai_tool_call(&turn, &tools).unwrap(), expected);
        let err = openai_tool_call(&turn, &["exec_command".to_owned()]).unwrap_err();
        assert_eq!(
            err,
            "fixture: the script calls tool `mcp__forge__signal_done`, which this request does not offer (offered: exec_command)"
        );
    }

    #[test]
    fn context_texts_are_not_prompts() {
        assert!(is_context_text("<system-reminder>\nx\n</system-reminder>"));
        assert!(is_context_text(
            "  <environment_context>\n  <cwd>/w</cwd>\n</environment_context>\n"
        ));
        assert!(is_context_text(
            "# AGENTS.md instructions for /w\n\n<INSTRUCTIONS>"
        ));
        assert!(is_context_text("  "));
        assert!(!is_context_text("fix the <b> tag"));
        assert!(!is_context_text("now also add a test"));
    }

    #[test]
    fn tool_names_reads_both_shapes() {
        let body = json!({"tools": [
            {"name": "Write", "input_schema": {}},
            {"type": "function", "name": "exec_command"},
            {"type": "function", "function": {"name": "legacy"}}
        ]});
        assert_eq!(tool_names(&body), vec!["Write", "exec_command", "legacy"]);
        assert_eq!(tool_names(&json!({})), Vec::<String>::new());
    }

    #[test]
    fn namespaced_tools_are_offered_by_their_qualified_name() {
        let body = json!({"tools": [
            {"type": "function", "name": "exec_command"},
            {"type": "namespace", "name": "mcp__forge", "tools": [
                {"type": "function", "name": "read_issue"},
                {"type": "function", "name": "signal_done"}
            ]}
        ]});
        let names = tool_names(&body);
        assert!(
            names.contains(&"mcp__forge__read_issue".to_owned()),
            "{names:?}"
        );
        assert_eq!(
            namespaced(&body, "mcp__forge__signal_done"),
            Some(("mcp__forge".to_owned(), "signal_done".to_owned()))
        );
        assert_eq!(namespaced(&body, "exec_command"), None);
        assert_eq!(namespaced(&body, "mcp__forge__nope"), None);
    }
}
