use http::Method;

/// What a request is, decided once from its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    OllamaChat,
    OllamaGenerate,
    OllamaEmbed,
    OllamaEmbeddings,
    OpenAiChat,
    OpenAiCompletions,
    OpenAiEmbeddings,
    /// `GET /api/tags`
    OllamaModels,
    /// `GET /v1/models`
    OpenAiModels,
    /// `GET /api/ps`: the models loaded now, a model list like `/api/tags`.
    OllamaRunning,
    /// `POST /api/show`: one model's details; names it in `model` (or the older `name`).
    OllamaShow,
    /// `GET /v1/models/{id}`: one model, named in the path.
    OpenAiModel,
    /// Ollama's model management (`pull`, `push`, `copy`, `create`, `delete`): names models
    /// in `model`/`name`, `source`/`destination`, `from`.
    OllamaManage,
    /// `POST`/`HEAD /api/blobs/{digest}`: a model layer's bytes, named by digest only.
    OllamaBlob,
    /// `GET /health`, answered by the gateway itself.
    Health,
    /// Anything else: proxied as is unless a filter (policy) says no.
    Other,
}

/// The wire format a route's response body is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    Ollama,
    OpenAi,
}

impl Route {
    /// Classifies a request. `path` must already be in canonical form.
    pub fn classify(method: &Method, path: &str) -> Route {
        let post = method == Method::POST;
        let get = method == Method::GET;
        match path {
            "/api/chat" if post => Route::OllamaChat,
            "/api/generate" if post => Route::OllamaGenerate,
            "/api/embed" if post => Route::OllamaEmbed,
            "/api/embeddings" if post => Route::OllamaEmbeddings,
            "/v1/chat/completions" if post => Route::OpenAiChat,
            "/v1/completions" if post => Route::OpenAiCompletions,
            "/v1/embeddings" if post => Route::OpenAiEmbeddings,
            "/api/tags" if get => Route::OllamaModels,
            "/v1/models" if get => Route::OpenAiModels,
            "/api/ps" if get => Route::OllamaRunning,
            "/api/show" if post => Route::OllamaShow,
            "/api/pull" | "/api/push" | "/api/copy" | "/api/create" if post => Route::OllamaManage,
            "/api/delete" if method == Method::DELETE => Route::OllamaManage,
            p if (post || method == Method::HEAD) && p.starts_with("/api/blobs/") => {
                Route::OllamaBlob
            }
            p if get && p.len() > "/v1/models/".len() && p.starts_with("/v1/models/") => {
                Route::OpenAiModel
            }
            "/health" if get => Route::Health,
            _ => Route::Other,
        }
    }

    /// Inference routes carry a JSON body naming a model; the gateway holds and parses it.
    pub fn is_inference(self) -> bool {
        matches!(
            self,
            Route::OllamaChat
                | Route::OllamaGenerate
                | Route::OllamaEmbed
                | Route::OllamaEmbeddings
                | Route::OpenAiChat
                | Route::OpenAiCompletions
                | Route::OpenAiEmbeddings
        )
    }

    /// Routes whose JSON body the gateway holds and parses before forwarding: inference, and
    /// the Ollama routes that name models in their body (so the model allow-list sees them).
    pub fn holds_body(self) -> bool {
        self.is_inference() || matches!(self, Route::OllamaShow | Route::OllamaManage)
    }

    /// Routes that answer with a list of models, filtered to what the caller may use.
    pub fn lists_models(self) -> bool {
        matches!(
            self,
            Route::OllamaModels | Route::OpenAiModels | Route::OllamaRunning
        )
    }

    pub fn wire_format(self) -> WireFormat {
        match self {
            Route::OllamaChat
            | Route::OllamaGenerate
            | Route::OllamaEmbed
            | Route::OllamaEmbeddings
            | Route::OllamaModels
            | Route::OllamaRunning
            | Route::OllamaShow
            | Route::OllamaManage
            | Route::OllamaBlob => WireFormat::Ollama,
            _ => WireFormat::OpenAi,
        }
    }

    /// Stable name used in logs, audit lines and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::OllamaChat => "ollama_chat",
            Route::OllamaGenerate => "ollama_generate",
            Route::OllamaEmbed => "ollama_embed",
            Route::OllamaEmbeddings => "ollama_embeddings",
            Route::OpenAiChat => "openai_chat",
            Route::OpenAiCompletions => "openai_completions",
            Route::OpenAiEmbeddings => "openai_embeddings",
            Route::OllamaModels => "ollama_models",
            Route::OpenAiModels => "openai_models",
            Route::OllamaRunning => "ollama_running",
            Route::OllamaShow => "ollama_show",
            Route::OpenAiModel => "openai_model",
            Route::OllamaManage => "ollama_manage",
            Route::OllamaBlob => "ollama_blob",
            Route::Health => "health",
            Route::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_routes_need_post() {
        assert_eq!(
            Route::classify(&Method::POST, "/api/chat"),
            Route::OllamaChat
        );
        assert_eq!(Route::classify(&Method::GET, "/api/chat"), Route::Other);
        assert!(Route::classify(&Method::POST, "/v1/embeddings").is_inference());
        assert!(!Route::classify(&Method::GET, "/v1/models").is_inference());
        assert_eq!(
            Route::classify(&Method::POST, "/v1/chat/completions").wire_format(),
            WireFormat::OpenAi
        );
    }
}
