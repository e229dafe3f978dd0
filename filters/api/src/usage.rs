/// Token usage of one request: reported by the model server, or counted by the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The server reported none (or the request ended before it could): completion tokens
    /// are the text events that passed, prompt tokens an estimate from the request body.
    pub counted: bool,
}

impl Usage {
    pub fn total(&self) -> u64 {
        // The figures are the backend's: a broken one must not wrap them.
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Why generation stopped, as the response said: OpenAI's `finish_reason` of each choice,
/// Ollama's `done_reason`. A set, since the choices of one request (`n`) may differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FinishReasons(u8);

/// The reasons the wire formats define; anything else is `other`.
const REASONS: [&str; 8] = [
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "function_call",
    "load",
    "unload",
    "other",
];

impl FinishReasons {
    pub fn add(&mut self, reason: &[u8]) {
        let i = REASONS[..7]
            .iter()
            .position(|r| r.as_bytes() == reason)
            .unwrap_or(7);
        self.0 |= 1 << i;
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = &'static str> {
        REASONS
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, r)| *r)
    }
}
