//! Message search over the caller's channels.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::{ErrorBody, SearchHit, SearchPage};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, Params};
use super::{AppState, messages};
use crate::search::Query;
use crate::store::{MAX_SEARCH_OFFSET, SearchOrder, SearchQuery};

const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 50;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search))
}

/// Searches the messages of the channels the caller is a member of (or of one of them):
/// every term of `q` must be in a message. Terms are words, `"quoted phrases"`,
/// `prefix*` (three letters at least) and `-excluded` words or phrases; case does not
/// matter (nor, on the embedded store, accents). Each hit comes with a snippet of its
/// text. Messages sent before the search are found, an edited one by its new text only,
/// a deleted one not at all.
#[utoipa::path(get, path = "/v1/search", tag = "messages", security(("bearer" = [])),
    params(("q" = String, Query, min_length = 1, max_length = 256, description = "The query: 1–256 characters, at most 16 terms, at least one word to look for"),
           ("channel_id" = Option<super::openapi::Id>, Query, description = "Only this channel's messages (404 if the caller is not a member)"),
           ("sort" = Option<String>, Query, pattern = "^(newest|relevance)$", description = "`newest` (the default) or `relevance` (best first)"),
           ("cursor" = Option<String>, Query, pattern = "^[1-9][0-9]{0,18}$", description = "The `next` of the previous page"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 50, description = "Results per page, default 20")),
    responses((status = 200, body = SearchPage),
              (status = 400, body = ErrorBody, description = "`invalid_query` with what is wrong with `q`, or another parameter's `invalid_field`"),
              (status = 404, body = ErrorBody, description = "`channel_id` names no channel the caller is in"),
              (status = 422, body = ErrorBody, description = "`search_too_broad`: it matches too much to answer in time; narrow it"),
              (status = 429, body = ErrorBody, description = "`rate_limited`: past the caller's search rate")))]
async fn search(
    State(state): State<AppState>,
    auth: Authed,
    params: Params,
) -> ApiResult<Json<SearchPage>> {
    let q = params
        .str("q")
        .ok_or_else(|| ApiError::invalid_field("q", "q (the query) is required"))?;
    let query = Query::parse(q).map_err(ApiError::invalid_query)?;
    let limit = params.int("limit", 1, MAX_PAGE)?.unwrap_or(DEFAULT_PAGE) as u32;
    let channel_id = match params.str("channel_id") {
        None => None,
        Some(id) => Some(
            super::extract::parse_id(id)
                .ok_or_else(|| ApiError::invalid_field("channel_id", "not a channel id"))?,
        ),
    };
    let order = match params.str("sort") {
        None | Some("newest") => SearchOrder::Newest,
        Some("relevance") => SearchOrder::Relevance,
        Some(_) => {
            return Err(ApiError::invalid_field(
                "sort",
                "sort must be `newest` or `relevance`",
            ));
        }
    };
    let from = match params.str("cursor") {
        None => None,
        Some(cursor) => {
            let bad = || ApiError::invalid_field("cursor", "cursor must be the `next` of a page");
            let n: i64 = cursor.parse().map_err(|_| bad())?;
            let fits = match order {
                SearchOrder::Newest => n > 0,
                SearchOrder::Relevance => (1..=MAX_SEARCH_OFFSET).contains(&n),
            };
            if !fits {
                return Err(bad());
            }
            Some(n)
        }
    };
    state.admit_search(auth.user.id)?;
    let search = SearchQuery {
        query,
        channel_id,
        order,
        from,
        limit,
    };
    let page = {
        // Closed only at shutdown, which answers 503 anyway.
        let _slot = state
            .search_slots
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable())?;
        state.store.search(auth.user.id, &search).await?
    };
    let next = match (page.items.last(), order) {
        (Some(last), SearchOrder::Newest) if page.has_more => Some(last.id.to_string()),
        (Some(_), SearchOrder::Relevance) if page.has_more => {
            let past = from.unwrap_or(0) + page.items.len() as i64;
            (past <= MAX_SEARCH_OFFSET).then(|| past.to_string())
        }
        _ => None,
    };
    let shown = messages::across_channels(&state, auth.user.id, &page.items).await?;
    // Each snippet from the message as shown (its text is the stored one).
    let results = shown
        .into_iter()
        .map(|message| SearchHit {
            snippet: crate::search::snippet(&message.text, &search.query)
                .into_iter()
                .map(Into::into)
                .collect(),
            message,
        })
        .collect();
    Ok(Json(SearchPage { results, next }))
}
