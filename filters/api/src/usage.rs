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
        self.prompt_tokens + self.completion_tokens
    }
}
