// The Natter web client: plain ES module, no build step, no dependencies.
//
// REST for accounts, channels and history; one WebSocket for live events, sends and
// read markers. Per channel the client keeps the last seq it has seen, resumes from it
// after every reconnect, and keeps messages by id, so a replayed or resent message is
// shown once. Sends carry a client_id: shown at once as pending, confirmed by the ack,
// and resent with the same client_id after a reconnect (the server answers a resend
// with the original). Message text only ever reaches the page as text nodes.

const $ = (id) => document.getElementById(id);
const PAGE = 50;

const state = {
  token: localStorage.getItem("natter.token"),
  me: null,
  channels: new Map(), // id → channel (with role, read_seq, unread, last_seq)
  seen: new Map(), // channel id → last seq received over the socket (resume position)
  current: null,
  views: new Map(), // channel id → { messages: Map id → message, oldest, hasOlder, loaded }
  pending: new Map(), // client_id → { channel_id, text, thread_root_id? }
  thread: null, // the open thread: { channel_id, root, replies: Map id → message }
  users: new Map(), // user id → username (or a promise of it)
  ws: null,
  wsReady: false,
  retry: 0,
  typing: new Map(), // channel id → Map user id → timer
  lastTypingSent: 0,
  lastFrameAt: 0,
  readSent: new Map(), // channel id → seq last sent as read
  presence: new Map(), // user id → { status, last_seen_at }
  members: new Map(), // channel id → member user ids (the open channel's, and those read)
  dmPeer: new Map(), // DM channel id → the other member's id
  idle: false, // whether this connection told the server it is idle
  watchQueue: new Set(), // user ids to watch with the next batched op
  watchTimer: null,
  watchedChannel: undefined, // the channel whose members are watched
  lastActive: Date.now(),
  drafts: [], // files picked for the next message: { key, name, progress, upload?, error?, xhr }
};

// ---- REST ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) {
    if (res.status === 401 && state.token && !path.startsWith("/v1/sessions")) logout();
    throw new ApiError(res.status, data);
  }
  return data;
}

function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/// A user as the server shows them (cached; `user.updated` replaces the entry).
async function userInfo(id) {
  if (id === state.me?.id) return state.me;
  if (!state.users.has(id)) {
    state.users.set(
      id,
      api("GET", `/v1/users/${id}`).catch(() => ({ id, username: `user ${id}` })),
    );
  }
  return state.users.get(id);
}

async function username(id) {
  return (await userInfo(id)).username;
}

/// The name to show for a user: their display name, else their username.
function shownName(u) {
  if (u.deleted) return "Deleted user";
  return u.display_name || u.username;
}

/// The user with this name (as typed, any letter case); "No such user" if there is none.
async function userNamed(name) {
  try {
    return await api("GET", `/v1/users?username=${encodeURIComponent(name.trim())}`);
  } catch (e) {
    if (e.status === 404) throw new Error("No such user");
    throw e;
  }
}

// ---- Log in and out --------------------------------------------------------------

async function signIn(register) {
  const username = $("username").value.trim();
  const password = $("password").value;
  const code = $("login-code").value.trim();
  $("login-error").textContent = "";
  try {
    let session;
    if (!register && state.challenge && code) {
      // The second step of a login with two-factor login on.
      try {
        session = await api("POST", "/v1/sessions/two-factor", { challenge: state.challenge, code });
      } catch (e) {
        if (e.code === "invalid_challenge") askForCode(null);
        throw e;
      }
    } else {
      session = await api("POST", register ? "/v1/users" : "/v1/sessions", {
        username,
        password,
      });
      if (session.two_factor_required) {
        askForCode(session.challenge);
        $("login-error").textContent = "Enter the code from your authenticator app, or a recovery code.";
        return;
      }
    }
    askForCode(null);
    state.token = session.token;
    localStorage.setItem("natter.token", session.token);
    await start();
  } catch (e) {
    $("login-error").textContent = e.message;
  }
}

/// Shows the login form's code field for a challenge, or hides it (`null`).
function askForCode(challenge) {
  state.challenge = challenge;
  $("login-code-row").hidden = !challenge;
  $("login-code").value = "";
  if (challenge) $("login-code").focus();
}

function logout() {
  if (state.token) {
    fetch("/v1/sessions/current", {
      method: "DELETE",
      headers: { authorization: `Bearer ${state.token}` },
    }).catch(() => {});
  }
  localStorage.removeItem("natter.token");
  location.reload();
}

async function start() {
  try {
    state.me = await api("GET", "/v1/users/me");
  } catch {
    state.token = null;
    localStorage.removeItem("natter.token");
    $("login").hidden = false;
    $("username").focus();
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  showMe();
  for (let after = ""; ; ) {
    const page = await api("GET", `/v1/channels?after=${after}`);
    for (const c of page.channels) addChannel(c);
    if (!page.next_after) break;
    after = page.next_after;
  }
  renderChannels();
  connect();
}

// ---- Channels --------------------------------------------------------------------

function addChannel(c) {
  const old = state.channels.get(c.id);
  state.channels.set(c.id, { unread: 0, read_seq: 0, role: "member", ...old, ...c });
  if (!state.seen.has(c.id)) state.seen.set(c.id, c.last_seq);
}

async function channelTitle(c) {
  if (c.kind !== "dm") return (c.kind === "broadcast" ? "📢 " : "# ") + (c.name || "");
  const { members } = await api("GET", `/v1/channels/${c.id}/members`).catch(() => ({
    members: [],
  }));
  const other = members.find((m) => m.user.id !== state.me.id);
  c.name = other ? (other.user.deleted ? "Deleted user" : other.user.username) : "direct message";
  if (other && !state.dmPeer.has(c.id)) {
    state.dmPeer.set(c.id, other.user.id);
    watchUsers([other.user.id]);
  }
  return "@ " + c.name;
}

function renderChannels() {
  const list = $("channels");
  const sorted = [...state.channels.values()].sort(
    (a, b) => (b.last_seq > 0) - (a.last_seq > 0) || (a.name || "").localeCompare(b.name || ""),
  );
  list.replaceChildren(
    ...sorted.map((c) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "channel-link";
      button.dataset.channel = c.id;
      if (c.id === state.current) button.setAttribute("aria-current", "true");
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = c.kind === "dm" ? "@ " + (c.name || "…") : (c.kind === "broadcast" ? "📢 " : "# ") + c.name;
      const peer = state.dmPeer.get(c.id);
      if (peer) {
        name.prepend(presenceDot(peer));
        button.setAttribute("aria-label", `${name.textContent}, ${presenceText(peer)}`);
      }
      button.append(name);
      if (c.mentions > 0 && c.id !== state.current) {
        const badge = document.createElement("span");
        badge.className = "badge mention-badge";
        badge.textContent = `@${c.mentions}`;
        badge.setAttribute("aria-label", `${c.mentions} ${c.mentions === 1 ? "mention" : "mentions"} of you`);
        button.append(badge);
      }
      if (c.unread > 0 && c.id !== state.current) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = String(c.unread);
        badge.setAttribute("aria-label", `${c.unread} unread`);
        button.append(badge);
      }
      button.addEventListener("click", () => openChannel(c.id));
      li.append(button);
      if (c.kind === "dm" && !c.name && !c.naming) {
        c.naming = true; // one lookup of the other member, not one per render
        channelTitle(c).then(() => renderChannels());
      }
      return li;
    }),
  );
}

async function openChannel(id) {
  if (state.thread && state.thread.channel_id !== id) closeThread();
  state.current = id;
  document.body.classList.add("in-channel");
  const c = state.channels.get(id);
  $("channel-title").textContent = await channelTitle(c);
  $("composer").hidden = c.kind === "broadcast" && c.role === "member";
  $("add-member").hidden = c.kind === "dm" || c.role === "member";
  showIntegrations(c);
  $("channel-error").textContent = "";
  renderTyping();
  renderDrafts();
  let view = state.views.get(id);
  if (!view) {
    view = { messages: new Map(), oldest: null, hasOlder: false, loaded: false };
    state.views.set(id, view);
  }
  if (!view.loaded) {
    const page = await api("GET", `/v1/channels/${id}/messages?limit=${PAGE}`);
    for (const m of page.messages) upsert(view, { reactions: [], ...m });
    view.hasOlder = page.has_more;
    view.loaded = true;
    // Messages whose reactions or replies changed while the page was on its way.
    for (const mid of view.stale || []) refreshMessage(id, mid);
    view.stale = null;
  }
  renderChannels();
  renderMessages(true);
  loadMembers(id);
  $("text").focus();
  markRead();
}

// ---- Presence --------------------------------------------------------------------

function presenceText(id) {
  const p = state.presence.get(id);
  if (!p) return "offline";
  if (p.status === "offline" && p.last_seen_at) {
    return `offline, last seen ${new Date(p.last_seen_at).toLocaleString()}`;
  }
  return p.status;
}

function presenceDot(id) {
  const dot = document.createElement("span");
  dot.className = `dot ${state.presence.get(id)?.status || "offline"}`;
  dot.setAttribute("aria-hidden", "true");
  return dot;
}

/// Reads the open channel's members and watches their presence; stops watching the
/// previous channel's (but for DM peers), so what is watched stays what is shown.
async function loadMembers(id) {
  try {
    const { members } = await api("GET", `/v1/channels/${id}/members`);
    for (const m of members) state.users.set(m.user.id, Promise.resolve(m.user));
    state.members.set(id, members.map((m) => m.user.id));
  } catch {
    return;
  }
  const before = state.watchedChannel;
  if (before !== undefined && before !== id) {
    const keep = new Set([...state.dmPeer.values(), ...state.members.get(id), state.me.id]);
    const drop = (state.members.get(before) || []).filter((u) => !keep.has(u));
    for (let i = 0; i < drop.length; i += 200) {
      sendFrame({ op: "presence.unsubscribe", user_ids: drop.slice(i, i + 200) });
    }
  }
  state.watchedChannel = id;
  sendFrame({ op: "presence.subscribe", channel_id: id });
  renderMembers();
}

/// Watches users (DM peers as their names resolve), batched into one op.
function watchUsers(ids) {
  for (const id of ids) state.watchQueue.add(id);
  if (state.watchTimer) return;
  state.watchTimer = setTimeout(() => {
    state.watchTimer = null;
    const all = [...state.watchQueue];
    state.watchQueue.clear();
    for (let i = 0; i < all.length; i += 200) {
      sendFrame({ op: "presence.subscribe", user_ids: all.slice(i, i + 200) });
    }
  }, 300);
}

function renderMembers() {
  const ids = state.members.get(state.current) || [];
  $("members").replaceChildren(
    ...ids.map((id) => {
      const li = document.createElement("li");
      li.dataset.user = id;
      li.dataset.status = state.presence.get(id)?.status || "offline";
      const name = document.createElement("span");
      name.textContent = "…";
      userInfo(id).then((u) => (name.textContent = shownName(u)));
      const said = document.createElement("span");
      said.className = "visually-hidden";
      said.textContent = `, ${presenceText(id)}`;
      li.title = presenceText(id);
      li.append(presenceDot(id), name, said);
      return li;
    }),
  );
}

function presenceArrived(list) {
  for (const p of list) state.presence.set(p.user_id, p);
  renderMembers();
  renderChannels();
}

/// Watches again what this page shows after a (re)connect or leaving a channel: the
/// server's watching ends with either.
function watchPresence() {
  if (state.current) sendFrame({ op: "presence.subscribe", channel_id: state.current });
  watchUsers([...state.dmPeer.values()]);
}

/// Idle after five minutes without a key, a click or a visible page; online again on the
/// next one.
function activity() {
  state.lastActive = Date.now();
  if (state.idle && !document.hidden && sendFrame({ op: "presence.set", status: "online" })) {
    state.idle = false;
  }
}
setInterval(() => {
  const away = document.hidden || Date.now() - state.lastActive > 5 * 60_000;
  if (away && !state.idle && sendFrame({ op: "presence.set", status: "idle" })) state.idle = true;
}, 30_000);

// ---- Search ----------------------------------------------------------------------

async function search(q) {
  const status = $("search-status");
  const list = $("search-results");
  status.textContent = "searching…";
  list.replaceChildren();
  let page;
  try {
    page = await api("GET", `/v1/search?q=${encodeURIComponent(q)}&limit=20`);
  } catch (err) {
    status.textContent = err.message;
    return;
  }
  const n = page.results.length;
  status.textContent = n ? `${n}${page.next ? "+" : ""} found` : "nothing found";
  list.replaceChildren(
    ...page.results.map(({ message, snippet }) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      const where = document.createElement("span");
      where.className = "where";
      const c = state.channels.get(message.channel_id);
      const at = new Date(message.created_at).toLocaleString();
      where.textContent = `${c ? (c.kind === "dm" ? "@ " : "# ") + (c.name || "") : "channel"} · ${at}`;
      const text = document.createElement("span");
      for (const piece of snippet) {
        // Text nodes only: the snippet is the user's text.
        if (piece.hit) {
          const mark = document.createElement("mark");
          mark.textContent = piece.text;
          text.append(mark);
        } else {
          text.append(piece.text);
        }
      }
      button.append(where, text);
      button.addEventListener("click", () => jumpTo(message));
      li.append(button);
      return li;
    }),
  );
}

/// Opens a found message where it is: in its channel's history (loading older pages up to
/// it), or in its thread.
async function jumpTo(m) {
  if (!state.channels.has(m.channel_id)) return;
  await openChannel(m.channel_id);
  if (m.thread_root_id) {
    const root = await api("GET", `/v1/channels/${m.channel_id}/messages/${m.thread_root_id}`).catch(() => null);
    if (!root) return;
    await openThread(root);
    return mark($("thread-messages").querySelector(`li[data-id="${m.id}"]`));
  }
  const view = state.views.get(m.channel_id);
  for (let i = 0; i < 40 && view && !view.messages.has(m.id) && view.hasOlder; i++) {
    await loadOlder();
  }
  mark($("messages").querySelector(`li[data-id="${m.id}"]`));
}

function mark(li) {
  if (!li) return;
  for (const old of document.querySelectorAll("li.found")) old.classList.remove("found");
  li.classList.add("found");
  li.tabIndex = -1;
  li.scrollIntoView({ block: "center" });
  li.focus();
}

// ---- Messages --------------------------------------------------------------------

/// Keeps the newest state of a message: deletion wins, then the later edit. Events carry
/// no reactions: a message keeps the ones it has until they are read again.
function upsert(view, m) {
  const old = view.messages.get(m.id);
  if (old && !m.deleted) {
    if (old.deleted) return;
    if ((old.edited_at || "") > (m.edited_at || "")) return;
    if (m.reactions === undefined) m = { ...m, reactions: old.reactions };
  }
  view.messages.set(m.id, m);
  if (view.oldest === null || m.seq < view.oldest) view.oldest = m.seq;
}

function renderMessages(toBottom) {
  const list = $("messages");
  const view = state.views.get(state.current);
  if (!view) return list.replaceChildren();
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const focus = focusedControl(list);
  // The channel's timeline: replies live in their threads.
  const shown = [...view.messages.values()].filter((m) => !m.thread_root_id).sort((a, b) => a.seq - b.seq);
  const items = withDays(shown, (m) => messageItem(m, false));
  for (const [cid, p] of state.pending) {
    if (p.channel_id === state.current && !p.thread_root_id) {
      items.push(
        messageItem({ id: cid, client_id: cid, author_id: state.me.id, text: p.text, pending: true }),
      );
    }
  }
  if (view.hasOlder) {
    const more = document.createElement("li");
    more.className = "more";
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = "Load older messages";
    b.addEventListener("click", loadOlder);
    more.append(b);
    items.unshift(more);
  }
  list.replaceChildren(...items);
  if (toBottom || nearBottom) list.scrollTop = list.scrollHeight;
  restoreFocus(list, focus);
  if (state.thread?.channel_id === state.current) renderThread(false);
}

/// A message's text as text nodes, each `@name` it mentions (as the server resolved
/// them) in a `<mark>` (the caller's own name) or `<strong>`.
function withMentions(m) {
  if (!(m.mentions || []).length) return [document.createTextNode(m.text)];
  const out = [];
  let rest = m.text;
  const re = /(^|[^A-Za-z0-9_.@-])@([A-Za-z0-9_.-]+)/;
  for (let found = re.exec(rest); found; found = re.exec(rest)) {
    const at = found.index + found[1].length;
    const name = found[2].replace(/[_.-]+$/, "");
    out.push(document.createTextNode(rest.slice(0, at)));
    const me = name.toLowerCase() === state.me.username;
    const el = document.createElement(me ? "mark" : "strong");
    el.className = "mention";
    el.textContent = "@" + name;
    out.push(el);
    rest = rest.slice(at + 1 + name.length);
  }
  out.push(document.createTextNode(rest));
  return out;
}

/// Message items with a separator before each new day.
function withDays(messages, item) {
  const out = [];
  let day = null;
  for (const m of messages) {
    const d = m.created_at ? new Date(m.created_at).toDateString() : day;
    if (d && d !== day) {
      const li = document.createElement("li");
      li.className = "day";
      li.setAttribute("role", "separator");
      li.textContent = dayLabel(new Date(m.created_at));
      out.push(li);
      day = d;
    }
    out.push(item(m));
  }
  return out;
}

function dayLabel(date) {
  const today = new Date();
  const yesterday = new Date(today.getTime() - 86_400_000);
  if (date.toDateString() === today.toDateString()) return "Today";
  if (date.toDateString() === yesterday.toDateString()) return "Yesterday";
  return date.toLocaleDateString(undefined, { weekday: "short", year: "numeric", month: "short", day: "numeric" });
}

/// Which control inside `list` has the focus, so a re-render can give it back.
function focusedControl(list) {
  const el = document.activeElement;
  if (!el || !list.contains(el) || el === list) return null;
  const li = el.closest("li");
  return li ? { id: li.dataset.id, label: el.getAttribute("aria-label"), text: el.textContent } : null;
}

function restoreFocus(list, focus) {
  if (!focus) return;
  for (const li of list.querySelectorAll("li")) {
    if (li.dataset.id !== focus.id) continue;
    const match = [...li.querySelectorAll("button")].find(
      (b) => (focus.label && b.getAttribute("aria-label")?.startsWith(focus.label.split(":")[0])) || b.textContent === focus.text,
    );
    if (match) match.focus();
    return;
  }
}

function messageItem(m, inThread) {
  const li = document.createElement("li");
  li.className = "message";
  if (m.seq !== undefined) li.dataset.seq = String(m.seq);
  li.dataset.id = m.id;
  if (m.pending) li.classList.add("pending");
  if (m.deleted) li.classList.add("deleted");
  const who = document.createElement("span");
  who.className = "author";
  who.textContent = m.author_id === state.me.id ? shownName(state.me) : "…";
  if (m.author_id !== state.me.id) {
    userInfo(m.author_id).then((u) => {
      who.textContent = shownName(u);
      if (u.display_name) who.title = `@${u.username}`;
      if (u.bot) {
        // Bots act through API keys; say so wherever they speak.
        const badge = document.createElement("span");
        badge.className = "bot-badge";
        badge.textContent = "BOT";
        badge.title = "A bot account";
        who.append(" ", badge);
      }
    });
  }
  const text = document.createElement("span");
  text.className = "text";
  if (m.deleted) text.textContent = "(deleted)";
  else text.append(...withMentions(m)); // always text nodes, never HTML
  if ((m.mentions || []).includes(state.me.id) && m.author_id !== state.me.id) li.classList.add("mentions-me");
  li.append(who, text);
  if (m.attachments?.length && !m.deleted) li.append(attachmentsBox(m));
  if (m.created_at) {
    const t = document.createElement("time");
    t.dateTime = m.created_at;
    const at = new Date(m.created_at);
    t.textContent = at.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    t.title = at.toLocaleString();
    li.append(t);
  }
  if (m.pending) {
    const s = document.createElement("span");
    s.className = "note";
    s.textContent = "sending…";
    li.append(s);
  } else if (m.edited_at && !m.deleted) {
    const s = document.createElement("span");
    s.className = "note";
    s.textContent = "(edited)";
    li.append(s);
  }
  if (!m.pending && !m.deleted) li.append(reactionBar(m));
  if (!m.pending && !inThread && !m.thread_root_id && (!m.deleted || m.reply_count)) {
    const t = document.createElement("button");
    t.type = "button";
    t.className = "small thread-link";
    const n = m.reply_count || 0;
    t.textContent = n ? `💬 ${n} ${n === 1 ? "reply" : "replies"}` : "Reply";
    t.setAttribute("aria-label", n ? `Open thread: ${n} ${n === 1 ? "reply" : "replies"}` : "Reply in thread");
    t.addEventListener("click", () => openThread(m));
    li.append(t);
  }
  if (!m.pending && !m.deleted && m.author_id === state.me.id) {
    const edit = document.createElement("button");
    edit.type = "button";
    edit.className = "small";
    edit.textContent = "Edit";
    edit.setAttribute("aria-label", "Edit message");
    edit.addEventListener("click", () => editMessage(li, m));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "small";
    del.textContent = "Delete";
    del.setAttribute("aria-label", "Delete message");
    del.addEventListener("click", () => deleteMessage(m));
    li.append(edit, del);
  }
  return li;
}

function editMessage(li, m) {
  const form = document.createElement("form");
  form.className = "edit";
  const input = document.createElement("input");
  input.value = m.text;
  input.setAttribute("aria-label", "Edited text");
  input.maxLength = 4000;
  form.append(input);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const updated = await api("PATCH", `/v1/channels/${m.channel_id}/messages/${m.id}`, {
        text: input.value,
      });
      upsert(state.views.get(m.channel_id), updated);
      renderMessages(false);
    } catch (err) {
      $("channel-error").textContent = err.message;
    }
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Escape") renderMessages(false);
  });
  li.querySelector(".text").replaceWith(form);
  input.focus();
}

// ---- Reactions -------------------------------------------------------------------

const PICKER = ["👍", "❤️", "😂", "🎉", "😮", "😢"];

/// A message's reactions as toggle buttons (pressed: the user's own), and a button that
/// opens a short picker.
function reactionBar(m) {
  const bar = document.createElement("span");
  bar.className = "reactions";
  for (const r of m.reactions || []) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "small reaction";
    b.textContent = `${r.emoji} ${r.count}`;
    b.setAttribute("aria-pressed", r.me ? "true" : "false");
    const who = r.count === 1 ? "1 reaction" : `${r.count} reactions`;
    b.setAttribute("aria-label", `${r.emoji}: ${who}${r.me ? ", including yours; remove yours" : "; add yours"}`);
    b.addEventListener("click", () => react(m, r.emoji, !r.me));
    bar.append(b);
  }
  const open = document.createElement("button");
  open.type = "button";
  open.className = "small";
  open.textContent = "☺+";
  open.setAttribute("aria-label", "Add a reaction");
  open.setAttribute("aria-expanded", "false");
  const picker = document.createElement("span");
  picker.className = "picker";
  picker.hidden = true;
  for (const emoji of PICKER) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "small";
    b.textContent = emoji;
    b.setAttribute("aria-label", `React with ${emoji}`);
    b.addEventListener("click", () => {
      picker.hidden = true;
      const mine = (m.reactions || []).some((r) => r.emoji === emoji && r.me);
      if (!mine) react(m, emoji, true);
    });
    picker.append(b);
  }
  open.addEventListener("click", () => {
    picker.hidden = !picker.hidden;
    open.setAttribute("aria-expanded", String(!picker.hidden));
    if (!picker.hidden) picker.querySelector("button").focus();
  });
  picker.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.preventDefault(); // the picker closes, not the thread around it
      picker.hidden = true;
      open.setAttribute("aria-expanded", "false");
      open.focus();
    }
  });
  bar.append(open, picker);
  return bar;
}

async function react(m, emoji, add) {
  const path = `/v1/channels/${m.channel_id}/messages/${m.id}/reactions/${encodeURIComponent(emoji)}`;
  try {
    await api(add ? "PUT" : "DELETE", path);
  } catch (err) {
    $("channel-error").textContent = `Reaction not saved: ${err.message}`;
  }
  // The event refreshes the counts, on this page as on every other.
}

const messageReads = new Map(); // message id → "busy" or "again"

/// Reads a message again after an event changed what it shows but not what the event
/// carries (its reactions, a root's reply count): counts kept by the server, since
/// applying events to a page read at some moment could count one twice.
async function refreshMessage(channelId, messageId) {
  const view = state.views.get(channelId);
  if (!view && state.thread?.channel_id !== channelId) return; // shown nowhere
  if (view && !view.loaded) {
    (view.stale ??= new Set()).add(messageId); // read once the first page is in
    return;
  }
  if (messageReads.has(messageId)) {
    messageReads.set(messageId, "again");
    return;
  }
  try {
    do {
      messageReads.set(messageId, "busy");
      const m = await api("GET", `/v1/channels/${channelId}/messages/${messageId}`);
      const fresh = { reactions: [], ...m };
      const v = state.views.get(channelId);
      if (v?.messages.has(messageId)) v.messages.set(messageId, fresh);
      const t = state.thread;
      if (t?.channel_id === channelId) {
        if (t.root.id === messageId) t.root = fresh;
        if (t.replies.has(messageId)) t.replies.set(messageId, fresh);
      }
      if (channelId === state.current) renderMessages(false);
    } while (messageReads.get(messageId) === "again");
  } catch {
    // A later event, or opening the channel again, reads it.
  } finally {
    messageReads.delete(messageId);
  }
}

// ---- Threads ---------------------------------------------------------------------

async function openThread(root) {
  const channel_id = root.channel_id;
  $("thread-error").textContent = "";
  try {
    const page = await api("GET", `/v1/channels/${channel_id}/threads/${root.id}/messages?limit=${PAGE}`);
    const replies = new Map();
    for (const m of page.messages) replies.set(m.id, { reactions: [], ...m });
    state.thread = { channel_id, root: { reactions: [], ...page.root }, replies };
  } catch (err) {
    $("channel-error").textContent = err.message;
    return;
  }
  $("thread").hidden = false;
  $("app").classList.add("with-thread");
  document.body.classList.add("in-thread");
  renderThread(true);
  $("thread-composer").hidden = state.channels.get(channel_id)?.kind === "broadcast" &&
    state.channels.get(channel_id)?.role === "member";
  $("thread-text").focus();
}

function closeThread() {
  const root = state.thread?.root.id;
  state.thread = null;
  $("thread").hidden = true;
  $("app").classList.remove("with-thread");
  document.body.classList.remove("in-thread");
  // Back to the message the thread was opened from.
  $("messages").querySelector(`li[data-id="${root}"] .thread-link`)?.focus();
}

function renderThread(toBottom) {
  const t = state.thread;
  const list = $("thread-messages");
  if (!t) return list.replaceChildren();
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const focus = focusedControl(list);
  const root = messageItem(t.root, true);
  root.classList.add("thread-root");
  const replies = [...t.replies.values()].sort((a, b) => a.seq - b.seq);
  const items = [root, ...withDays(replies, (m) => messageItem(m, true))];
  for (const [cid, p] of state.pending) {
    if (p.thread_root_id === t.root.id) {
      items.push(messageItem({ id: cid, client_id: cid, author_id: state.me.id, text: p.text, pending: true }, true));
    }
  }
  list.replaceChildren(...items);
  if (toBottom || nearBottom) list.scrollTop = list.scrollHeight;
  restoreFocus(list, focus);
}

function sendReply(text) {
  const t = state.thread;
  if (!t || !text.trim()) return;
  const client_id = newClientId();
  const p = { channel_id: t.channel_id, text, thread_root_id: t.root.id };
  state.pending.set(client_id, p);
  renderThread(true);
  sendFrame({ op: "send", client_id, ...p });
}

/// A reply arrived (by event or ack): into its open thread, and its root read again
/// where it is shown (its reply count).
function replyArrived(m) {
  const t = state.thread;
  const open = t && t.channel_id === m.channel_id && t.root.id === m.thread_root_id;
  if (open) {
    const old = t.replies.get(m.id);
    t.replies.set(m.id, { reactions: old?.reactions ?? [], ...m });
  }
  const view = state.views.get(m.channel_id);
  if (open || view?.messages.has(m.thread_root_id) || (view && !view.loaded)) {
    refreshMessage(m.channel_id, m.thread_root_id);
  }
}

async function deleteMessage(m) {
  try {
    await api("DELETE", `/v1/channels/${m.channel_id}/messages/${m.id}`);
    const gone = { ...m, deleted: true, text: "" };
    const view = state.views.get(m.channel_id);
    if (view) upsert(view, gone);
    if (state.thread?.replies.has(m.id)) state.thread.replies.set(m.id, gone);
    if (state.thread?.root.id === m.id) state.thread.root = gone;
    renderMessages(false);
    renderThread(false);
  } catch (err) {
    $("channel-error").textContent = err.message;
  }
}

let loadingOlder = false;
async function loadOlder() {
  const id = state.current;
  const view = state.views.get(id);
  if (!view || !view.hasOlder || loadingOlder) return;
  loadingOlder = true;
  try {
    const list = $("messages");
    const before = list.scrollHeight - list.scrollTop;
    const page = await api(
      "GET",
      `/v1/channels/${id}/messages?before_seq=${view.oldest}&limit=${PAGE}`,
    );
    for (const m of page.messages) upsert(view, { reactions: [], ...m });
    view.hasOlder = page.has_more;
    if (state.current === id) {
      renderMessages(false);
      list.scrollTop = list.scrollHeight - before; // keep what was on screen in place
    }
  } finally {
    loadingOlder = false;
  }
}

/// Sends the composer's text (over the socket), or with the uploaded files a message
/// that carries them (over REST). `false` when it must wait (uploads in progress).
function send(text) {
  const channel_id = state.current;
  if (!channel_id) return;
  const drafts = state.drafts.filter((d) => d.channel_id === channel_id);
  if (drafts.some((d) => !d.upload && !d.error)) {
    $("channel-error").textContent = WAIT_UPLOADS;
    return false;
  }
  const ready = drafts.filter((d) => d.upload);
  if (ready.length > 10) {
    $("channel-error").textContent = "A message carries at most 10 files: remove some.";
    return false;
  }
  if (ready.length) {
    sendWithFiles(channel_id, text, ready);
    return false; // the text stays until the message is posted
  }
  if (!text.trim()) return;
  const client_id = newClientId();
  state.pending.set(client_id, { channel_id, text });
  state.lastTypingSent = 0; // the next keystroke starts a new typing signal
  renderMessages(true);
  sendFrame({ op: "send", channel_id, text, client_id });
}

// ---- Files -----------------------------------------------------------------------
// A file is uploaded as soon as it is picked, pasted or dropped (with progress), and
// sent with the next message over REST (the socket's sends carry text only). File bytes
// need the session's token, so they are fetched and shown through blob: URLs.

const WAIT_UPLOADS = "Wait for the uploads to finish.";

function addFiles(list) {
  const channel_id = state.current;
  if (!channel_id) return;
  for (const file of list) {
    const d = { key: newClientId(), channel_id, name: file.name || "pasted file", progress: 0, upload: null, error: null };
    const xhr = new XMLHttpRequest();
    d.xhr = xhr;
    xhr.open("POST", `/v1/uploads?name=${encodeURIComponent(d.name)}`);
    xhr.setRequestHeader("authorization", `Bearer ${state.token}`);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) {
        d.progress = e.loaded / e.total;
        renderDrafts();
      }
    };
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {}
      if (xhr.status === 201) d.upload = body;
      else d.error = body?.error?.message || `upload failed (HTTP ${xhr.status})`;
      renderDrafts();
    };
    xhr.onerror = () => {
      d.error = "upload failed";
      renderDrafts();
    };
    xhr.send(file);
    state.drafts.push(d);
  }
  renderDrafts();
}

/// The open channel's files to send (each channel keeps its own).
function renderDrafts() {
  const drafts = state.drafts.filter((d) => d.channel_id === state.current);
  if (!drafts.some((d) => !d.upload && !d.error) && $("channel-error").textContent === WAIT_UPLOADS) {
    $("channel-error").textContent = "";
  }
  $("drafts").replaceChildren(
    ...drafts.map((d) => {
      const li = document.createElement("li");
      li.dataset.key = d.key;
      const name = document.createElement("span");
      name.textContent = d.name;
      li.append(name);
      if (d.error) {
        const e = document.createElement("span");
        e.className = "failed";
        e.textContent = d.error;
        li.append(e);
      } else if (!d.upload) {
        const p = document.createElement("progress");
        p.max = 1;
        p.value = d.progress;
        p.setAttribute("aria-label", `Uploading ${d.name}`);
        li.append(p);
      } else {
        li.classList.add("ready");
        const s = document.createElement("span");
        s.textContent = sizeText(d.upload.size);
        li.append(s);
      }
      const x = button("✕", () => {
        d.xhr.abort();
        state.drafts = state.drafts.filter((o) => o !== d);
        renderDrafts();
      });
      x.className = "small";
      x.setAttribute("aria-label", `Remove ${d.name}`);
      li.append(x);
      return li;
    }),
  );
}

/// Posts the text with the files. The composer keeps the text until the message is
/// posted; a retry after a failure reuses the client_id, so it never posts twice.
async function sendWithFiles(channel_id, text, ready) {
  const client_id = ready[0].client_id || newClientId();
  for (const d of ready) d.client_id = client_id;
  const body = { client_id, attachments: ready.map((d) => d.upload.id) };
  if (text.trim()) body.text = text;
  try {
    const m = await api("POST", `/v1/channels/${channel_id}/messages`, body);
    state.drafts = state.drafts.filter((d) => !ready.includes(d));
    if (state.current === channel_id && $("text").value === text) $("text").value = "";
    renderDrafts();
    const view = state.views.get(channel_id);
    if (view) {
      upsert(view, m);
      if (state.current === channel_id) renderMessages(true);
    }
  } catch (err) {
    $("channel-error").textContent = err.message;
  }
}

function sizeText(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

/// A file's bytes as a blob: URL (thumbnails are kept: they are small and shown again).
const thumbs = new Map(); // path → Promise of a blob: URL
function fileUrl(path, keep) {
  if (keep && thumbs.has(path)) return thumbs.get(path);
  const got = fetch(path, { headers: { authorization: `Bearer ${state.token}` } }).then(async (r) => {
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    return URL.createObjectURL(await r.blob());
  });
  if (keep) {
    thumbs.set(path, got);
    got.catch(() => thumbs.delete(path));
  }
  return got;
}

function attachmentsBox(m) {
  const box = document.createElement("div");
  box.className = "attachments";
  for (const f of m.attachments) {
    const item = document.createElement("div");
    item.className = "attachment";
    item.dataset.file = f.id;
    if (f.thumbnail) {
      const img = document.createElement("img");
      img.className = "attachment-thumb";
      img.alt = f.name;
      if (f.width && f.height) {
        const scale = Math.min(1, 320 / Math.max(f.width, f.height));
        img.width = Math.max(1, Math.round(f.width * scale));
        img.height = Math.max(1, Math.round(f.height * scale));
      }
      fileUrl(`/v1/files/${f.id}/thumbnail`, true)
        .then((url) => {
          img.src = url;
        })
        .catch(() => {
          img.alt = `${f.name} (no preview)`;
        });
      item.append(img);
    }
    const a = document.createElement("a");
    a.href = "#";
    a.className = "download";
    a.textContent = `⬇ ${f.name} (${sizeText(f.size)})`;
    a.setAttribute("aria-label", `Download ${f.name}`);
    a.addEventListener("click", async (e) => {
      e.preventDefault();
      try {
        const url = await fileUrl(`/v1/files/${f.id}`, false);
        const link = document.createElement("a");
        link.href = url;
        link.download = f.name;
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60_000);
      } catch (err) {
        $("channel-error").textContent = `Download failed: ${err.message}`;
      }
    });
    item.append(a);
    box.append(item);
  }
  return box;
}

// ---- Real time -------------------------------------------------------------------

/// The connection status, in the sidebar and (when not online) over the channel, so it
/// shows on a phone too.
function setStatus(text, online) {
  $("status").textContent = text;
  $("status").classList.toggle("offline", !online);
  $("channel-status").textContent = text;
  $("channel-status").hidden = online;
}

function connect() {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
  const ws = new WebSocket(url);
  state.ws = ws;
  state.wsReady = false;
  setStatus(state.retry ? "reconnecting…" : "connecting…", false);
  ws.addEventListener("open", () => {
    const resume = {};
    for (const [id, seq] of state.seen) resume[id] = seq;
    ws.send(JSON.stringify({ op: "hello", token: state.token, resume }));
  });
  ws.addEventListener("message", (e) => {
    state.lastFrameAt = Date.now();
    onFrame(JSON.parse(e.data));
  });
  ws.addEventListener("close", (e) => {
    if (state.ws !== ws) return;
    state.wsReady = false;
    if (e.code === 4001) return logout();
    state.retry += 1;
    // 4009: this account has too many connections open (other tabs or devices); wait
    // longer before trying again, and say why.
    const most = e.code === 4009 ? 30000 : 5000;
    const wait = Math.min(most, 250 * 2 ** Math.min(state.retry, 7)) * (0.5 + Math.random() / 2);
    const why = e.code === 4009 ? "too many open connections (other tabs?)" : "offline";
    setStatus(`${why}, retrying in ${Math.ceil(wait / 1000)} s`, false);
    setTimeout(connect, wait);
  });
}

// A connection lost without a close (a dropped network) is noticed by our own pings: one
// every 15 s, and a socket silent for 35 s is closed, which reconnects and resumes.
setInterval(() => {
  if (!state.wsReady || state.ws.readyState !== WebSocket.OPEN) return;
  if (Date.now() - state.lastFrameAt > 35_000) {
    // Its close handshake may never finish on a dead network: reconnect now.
    const dead = state.ws;
    state.retry += 1;
    connect();
    return dead.close();
  }
  state.ws.send(JSON.stringify({ op: "ping" }));
}, 15_000);

/// Sends a frame if the socket is ready; says whether it did. (Pending sends go out
/// again after the next `ready`; a read marker not sent is sent with the next one.)
function sendFrame(frame) {
  if (state.wsReady && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

function onFrame(f) {
  switch (f.type) {
    case "ready":
      state.wsReady = true;
      state.retry = 0;
      setStatus("online", true);
      for (const c of f.channels) {
        if (!state.seen.has(c.id)) state.seen.set(c.id, c.last_seq);
      }
      // Unanswered sends again, in order, with their client ids: never a second message.
      for (const [client_id, p] of state.pending) {
        state.ws.send(JSON.stringify({ op: "send", client_id, ...p }));
      }
      markRead(); // one that could not be sent while offline
      state.idle = false;
      watchPresence();
      break;
    case "ack": {
      state.pending.delete(f.client_id);
      const view = state.views.get(f.message.channel_id);
      if (view) upsert(view, f.message);
      if (f.message.thread_root_id) {
        replyArrived(f.message);
        renderThread(true);
      }
      if (f.message.channel_id === state.current) renderMessages(!f.message.thread_root_id);
      break;
    }
    case "error":
      if (f.client_id && state.pending.has(f.client_id)) {
        const p = state.pending.get(f.client_id);
        state.pending.delete(f.client_id);
        if (p.thread_root_id) {
          // Back into the thread's composer (never the channel's: it would post outside).
          if (state.thread?.root.id === p.thread_root_id) $("thread-text").value = p.text;
          $("thread-error").textContent = `Reply not sent: ${f.error.message}`;
          $("channel-error").textContent = `Reply not sent: ${f.error.message}`;
          renderThread(false);
        } else if (p.channel_id === state.current) {
          $("channel-error").textContent = `Not sent: ${f.error.message}`;
          $("text").value = p.text;
          renderMessages(false);
        }
      }
      break;
    case "typing":
      showTyping(f.channel_id, f.user_id);
      break;
    case "channel.joined":
      addChannel(f.channel);
      renderChannels();
      break;
    case "channel.left":
      state.channels.delete(f.channel_id);
      state.seen.delete(f.channel_id);
      state.views.delete(f.channel_id);
      if (state.thread?.channel_id === f.channel_id) closeThread();
      state.dmPeer.delete(f.channel_id);
      if (state.current === f.channel_id) {
        state.current = null;
        $("members").replaceChildren();
        $("channel-title").textContent = "Pick a channel";
        $("messages").replaceChildren();
        $("composer").hidden = true;
      }
      state.watchedChannel = undefined;
      watchPresence(); // leaving a channel ends the server's watching
      renderChannels();
      break;
    case "user.updated":
      // Someone who shares a channel (or this user, elsewhere) changed their profile.
      if (f.user.id === state.me.id) {
        state.me = { ...state.me, ...f.user };
        if (f.user.display_name === undefined) delete state.me.display_name;
        if (f.user.about === undefined) delete state.me.about;
        showMe();
      } else {
        state.users.set(f.user.id, Promise.resolve(f.user));
      }
      if (state.current) renderMessages(false);
      renderThread(false);
      break;
    case "presence":
      presenceArrived(f.users);
      break;
    case "presence.updated":
      presenceArrived([f]);
      break;
    case "pong":
      break;
    default:
      if (f.seq !== undefined) onEvent(f);
  }
}

function onEvent(e) {
  const id = e.channel_id;
  const seen = state.seen.get(id) ?? 0;
  if (e.seq <= seen) return; // already had it
  state.seen.set(id, e.seq);
  const c = state.channels.get(id);
  if (c) c.last_seq = e.seq;
  const view = state.views.get(id);
  if (e.message) {
    if (view) upsert(view, e.message);
    // Our own send, here before its ack: shown once, not pending beside itself.
    if (e.message.author_id === state.me.id && e.message.client_id) state.pending.delete(e.message.client_id);
    const t = state.thread;
    if (t?.channel_id === id) {
      // Edits and deletes of what the open thread shows.
      if (t.root.id === e.message.id) t.root = { ...t.root, ...e.message, reactions: t.root.reactions };
      if (t.replies.has(e.message.id)) {
        t.replies.set(e.message.id, { ...e.message, reactions: t.replies.get(e.message.id).reactions });
      }
    }
    if (e.message.thread_root_id && e.type !== "message.edited") {
      replyArrived(e.message);
      renderThread(false);
    }
    if (e.type === "message.created") {
      clearTyping(id, e.message.author_id);
      if (id === state.current && e.message.author_id !== state.me.id) {
        // For screen readers: only the new message, not the whole re-rendered list.
        username(e.message.author_id).then((n) => ($("announce").textContent = `${n}: ${e.message.text}`));
      }
      if (c && e.message.author_id !== state.me.id && !(id === state.current && visible())) {
        c.unread += 1;
        if ((e.message.mentions || []).includes(state.me.id)) c.mentions = (c.mentions || 0) + 1;
      }
    }
  } else if ((e.type === "member.added" || e.type === "member.updated") && c && e.user_id === state.me.id && e.role) {
    c.role = e.role; // a promotion shows the composer of a broadcast channel, and so on
    if (id === state.current) {
      $("composer").hidden = c.kind === "broadcast" && c.role === "member";
      $("add-member").hidden = c.kind === "dm" || c.role === "member";
      showIntegrations(c);
    }
  } else if (
    e.type.startsWith("reaction.") &&
    ((view && (view.messages.has(e.message_id) || !view.loaded)) ||
      (state.thread?.channel_id === id && (state.thread.root.id === e.message_id || state.thread.replies.has(e.message_id))))
  ) {
    refreshMessage(id, e.message_id);
  } else if (e.type === "channel.updated" && c && e.name !== undefined) {
    c.name = e.name;
    if (id === state.current) $("channel-title").textContent = (c.kind === "broadcast" ? "📢 " : "# ") + c.name;
  }
  if (id === state.current && (e.type === "member.added" || e.type === "member.removed")) {
    loadMembers(id); // the member list and whose presence to watch
  }
  if (id === state.current) {
    renderMessages(false);
    markRead();
  }
  renderChannels();
}

function visible() {
  return document.visibilityState === "visible";
}

/// Moves the read marker to the newest seq once the bottom of the channel is on screen.
function markRead() {
  const id = state.current;
  const c = state.channels.get(id);
  if (!c || !visible()) return;
  const list = $("messages");
  if (list.scrollHeight - list.scrollTop - list.clientHeight > 40) return;
  const seq = state.seen.get(id) ?? c.last_seq;
  if ((state.readSent.get(id) ?? c.read_seq) < seq && sendFrame({ op: "read", channel_id: id, seq })) {
    state.readSent.set(id, seq);
    c.read_seq = seq;
  }
  if (c.unread !== 0 || c.mentions) {
    c.unread = 0;
    c.mentions = 0;
    renderChannels();
  }
}

function showTyping(channelId, userId) {
  if (userId === state.me.id) return;
  let who = state.typing.get(channelId);
  if (!who) state.typing.set(channelId, (who = new Map()));
  clearTimeout(who.get(userId));
  who.set(userId, setTimeout(() => clearTyping(channelId, userId), 3000));
  renderTyping();
}

function clearTyping(channelId, userId) {
  const who = state.typing.get(channelId);
  if (who && who.has(userId)) {
    clearTimeout(who.get(userId));
    who.delete(userId);
    renderTyping();
  }
}

async function renderTyping() {
  const who = state.typing.get(state.current);
  if (!who || who.size === 0) return ($("typing").textContent = "");
  const names = await Promise.all([...who.keys()].map(username));
  $("typing").textContent = `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…`;
}

// ---- Wiring ----------------------------------------------------------------------

function wire() {
  wireIntegrations();
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn(false);
  });
  $("register-button").addEventListener("click", () => {
    if ($("login-form").reportValidity()) signIn(true);
  });
  $("logout").addEventListener("click", logout);
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    search($("search-q").value);
  });
  for (const kind of ["keydown", "pointerdown", "visibilitychange"]) {
    document.addEventListener(kind, activity);
  }
  $("back").addEventListener("click", () => document.body.classList.remove("in-channel"));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (send($("text").value) !== false) $("text").value = "";
  });
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  });
  $("text").addEventListener("paste", (e) => {
    const files = e.clipboardData?.files;
    if (files?.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  const area = document.querySelector(".channel");
  const dropping = (e) => e.dataTransfer?.types?.includes("Files") && state.current && !$("composer").hidden;
  area.addEventListener("dragover", (e) => {
    if (!dropping(e)) return;
    e.preventDefault();
    area.classList.add("dropping");
  });
  area.addEventListener("dragleave", (e) => {
    if (!area.contains(e.relatedTarget)) area.classList.remove("dropping");
  });
  area.addEventListener("drop", (e) => {
    area.classList.remove("dropping");
    if (!dropping(e) || !e.dataTransfer.files.length) return;
    e.preventDefault();
    addFiles(e.dataTransfer.files);
  });
  $("thread-composer").addEventListener("submit", (e) => {
    e.preventDefault();
    $("thread-error").textContent = "";
    sendReply($("thread-text").value);
    $("thread-text").value = "";
  });
  $("thread-text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("thread-composer").requestSubmit();
    }
  });
  $("thread-close").addEventListener("click", closeThread);
  $("thread").addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !e.defaultPrevented) closeThread();
  });
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("text").addEventListener("input", () => {
    const now = Date.now();
    if (state.current && now - state.lastTypingSent > 2000) {
      state.lastTypingSent = now;
      sendFrame({ op: "typing", channel_id: state.current });
    }
  });
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 60) loadOlder();
    markRead();
  });
  document.addEventListener("visibilitychange", markRead);
  $("new-channel").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("side-error").textContent = "";
    try {
      const c = await api("POST", "/v1/channels", {
        name: $("new-channel-name").value.trim(),
        kind: $("new-channel-kind").value,
        members: [],
      });
      $("new-channel-name").value = "";
      addChannel({ ...c, role: "owner" });
      renderChannels();
      openChannel(c.id);
    } catch (err) {
      $("side-error").textContent = err.message;
    }
  });
  $("new-dm").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("side-error").textContent = "";
    try {
      const user = await userNamed($("new-dm-username").value);
      const c = await api("POST", "/v1/dms", { user_id: user.id });
      $("new-dm-username").value = "";
      addChannel(c);
      renderChannels();
      openChannel(c.id);
    } catch (err) {
      $("side-error").textContent = err.message;
    }
  });
  $("add-member").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("channel-error").textContent = "";
    try {
      const user = await userNamed($("add-member-username").value);
      await api("PUT", `/v1/channels/${state.current}/members/${user.id}`, {});
      $("add-member-username").value = "";
    } catch (err) {
      $("channel-error").textContent = err.message;
    }
  });
}

// ---- Webhooks (a channel's owner and admins) ------------------------------------

/// The webhooks panel: shown to a channel's owner and admins (not in DMs), closed and
/// emptied when the channel changes.
function showIntegrations(c) {
  const panel = $("integrations");
  panel.hidden = c.kind === "dm" || c.role === "member";
  panel.open = false;
  for (const id of ["hooks", "subs"]) $(id).replaceChildren();
  for (const id of ["new-hook-path", "new-sub-secret"]) $(id).hidden = true;
  $("integrations-error").textContent = "";
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

/// Lists the channel's incoming webhooks and outgoing subscriptions with where each
/// delivery stands (status, lag, last error, next try).
async function loadIntegrations() {
  const channel = state.current;
  if (!channel || !$("integrations").open) return;
  try {
    const [hooks, subs] = await Promise.all([
      api("GET", `/v1/channels/${channel}/webhooks`),
      api("GET", `/v1/channels/${channel}/subscriptions`),
    ]);
    if (channel !== state.current) return;
    $("hooks").replaceChildren(...hooks.webhooks.map((h) => {
      const li = document.createElement("li");
      li.textContent = `${h.name} `;
      li.append(button("Delete", async () => {
        await api("DELETE", `/v1/channels/${channel}/webhooks/${h.id}`).catch(showIntegrationError);
        loadIntegrations();
      }));
      return li;
    }));
    $("subs").replaceChildren(...subs.subscriptions.map((s) => {
      const li = document.createElement("li");
      li.className = `subscription ${s.status}`;
      const facts = [s.status, `${s.delivered} delivered`, `${s.lag} behind`];
      if (s.failures > 0) facts.push(`${s.failures} failures`);
      if (s.next_try_at) facts.push(`next try ${new Date(s.next_try_at).toLocaleTimeString()}`);
      li.textContent = `${s.url} — ${facts.join(", ")}`;
      if (s.last_error && s.failures > 0) li.title = s.last_error;
      const next = s.status === "active" ? "paused" : "active";
      li.append(" ", button(next === "paused" ? "Pause" : "Resume", async () => {
        await api("PATCH", `/v1/channels/${channel}/subscriptions/${s.id}`, { status: next })
          .catch(showIntegrationError);
        loadIntegrations();
      }));
      li.append(" ", button("Delete", async () => {
        await api("DELETE", `/v1/channels/${channel}/subscriptions/${s.id}`).catch(showIntegrationError);
        loadIntegrations();
      }));
      return li;
    }));
  } catch (err) {
    showIntegrationError(err);
  }
}

function showIntegrationError(err) {
  $("integrations-error").textContent = err.message;
}

function wireIntegrations() {
  $("integrations").addEventListener("toggle", loadIntegrations);
  // Delivery status moves on its own: read it again while the panel is open.
  setInterval(loadIntegrations, 5000);
  $("new-hook").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("integrations-error").textContent = "";
    try {
      const made = await api("POST", `/v1/channels/${state.current}/webhooks`, {
        name: $("new-hook-name").value,
      });
      $("new-hook-name").value = "";
      // Shown once: the server keeps only its digest.
      const url = new URL(made.path, location.origin).href;
      $("new-hook-path").textContent = `POST {"text": "…"} to ${url} (shown once; copy it now)`;
      $("new-hook-path").hidden = false;
      loadIntegrations();
    } catch (err) {
      showIntegrationError(err);
    }
  });
  $("new-sub").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("integrations-error").textContent = "";
    try {
      const made = await api("POST", `/v1/channels/${state.current}/subscriptions`, {
        url: $("new-sub-url").value,
      });
      $("new-sub-url").value = "";
      $("new-sub-secret").textContent = `Signing secret (shown once): ${made.secret}`;
      $("new-sub-secret").hidden = false;
      loadIntegrations();
    } catch (err) {
      showIntegrationError(err);
    }
  });
}

// ---- Sessions --------------------------------------------------------------------

/// A readable name for a User-Agent: the browser and the system, or its first words.
function shortAgent(ua) {
  if (!ua) return "unknown client";
  const browser = ["Firefox", "Edg", "Chrome", "Safari"].find((b) => ua.includes(`${b}/`));
  const os = ["Android", "iPhone", "iPad", "Windows", "Mac OS X", "Linux"].find((o) => ua.includes(o));
  if (browser) return `${browser === "Edg" ? "Edge" : browser}${os ? ` on ${os}` : ""}`;
  return ua.length > 40 ? `${ua.slice(0, 40)}…` : ua;
}

async function loadSessions() {
  $("side-error").textContent = "";
  try {
    const { sessions } = await api("GET", "/v1/sessions");
    const list = $("sessions");
    list.replaceChildren();
    for (const s of sessions) {
      const li = document.createElement("li");
      const what = document.createElement("span");
      const used = new Date(s.last_used_at).toLocaleString();
      what.textContent = `${shortAgent(s.agent)} · ${s.address} · last used ${used}`;
      what.title = s.agent;
      li.append(what);
      if (s.current) {
        const me = document.createElement("em");
        me.textContent = " (this session)";
        li.append(me);
      } else {
        const end = document.createElement("button");
        end.type = "button";
        end.textContent = "End";
        end.setAttribute("aria-label", `End the session of ${shortAgent(s.agent)} from ${s.address}`);
        end.addEventListener("click", async () => {
          try {
            await api("DELETE", `/v1/sessions/${s.id}`);
          } catch (err) {
            $("side-error").textContent = err.message;
          }
          loadSessions();
        });
        li.append(end);
      }
      list.append(li);
    }
  } catch (err) {
    $("side-error").textContent = err.message;
  }
}

function showMe() {
  $("me-name").textContent = shownName(state.me);
  $("me-name").title = `@${state.me.username}`;
}

function wireProfile() {
  $("profile-panel").addEventListener("toggle", () => {
    if (!$("profile-panel").open) return;
    // The toggle event comes a moment after the panel opens: what was typed by then
    // stays.
    if (!$("profile-name").value) $("profile-name").value = state.me.display_name || "";
    if (!$("profile-about").value) $("profile-about").value = state.me.about || "";
    $("profile-status").textContent = "";
  });
  $("profile-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = $("profile-name").value.trim();
    const about = $("profile-about").value;
    try {
      const me = await api("PATCH", "/v1/users/me", {
        display_name: name || null,
        about: about.trim() ? about : null,
      });
      state.me = me;
      showMe();
      $("profile-status").textContent = "Saved.";
      if (state.current) renderMessages(false);
    } catch (err) {
      $("profile-status").textContent = err.message;
    }
  });
}

function wireSessions() {
  $("sessions-panel").addEventListener("toggle", () => {
    if ($("sessions-panel").open) loadSessions();
  });
  $("logout-others").addEventListener("click", async () => {
    try {
      await api("DELETE", "/v1/sessions/others");
    } catch (err) {
      $("side-error").textContent = err.message;
    }
    loadSessions();
  });
}

// ---- Security: two-factor login, password, export -------------------------------------

async function loadSecurity() {
  try {
    const s = await api("GET", "/v1/users/me/two-factor");
    $("twofa-status").textContent = s.enabled
      ? `Two-factor login is on (${s.recovery_codes_left} recovery codes left).`
      : "Two-factor login is off: your password alone logs you in.";
    $("twofa-enrol-form").hidden = s.enabled || !$("twofa-setup").hidden;
    $("twofa-disable-form").hidden = !s.enabled;
    $("pw-code-row").hidden = !s.enabled;
    $("pw-code").required = s.enabled;
    $("delete-code-row").hidden = !s.enabled;
    $("delete-code").required = s.enabled;
  } catch (err) {
    $("security-status").textContent = err.message;
  }
}

function showRecoveryCodes(codes) {
  const list = $("twofa-recovery-codes");
  list.replaceChildren(
    ...codes.map((c) => {
      const li = document.createElement("li");
      li.textContent = c;
      return li;
    }),
  );
  $("twofa-recovery").hidden = false;
}

/// Runs a form's request, saying what happened in the panel's status line.
function securityForm(id, run) {
  $(id).addEventListener("submit", async (e) => {
    e.preventDefault();
    $("security-status").textContent = "";
    try {
      $("security-status").textContent = (await run()) || "";
    } catch (err) {
      $("security-status").textContent = err.message;
    }
    loadSecurity();
  });
}

function wireSecurity() {
  $("security-panel").addEventListener("toggle", () => {
    if ($("security-panel").open) loadSecurity();
  });
  securityForm("twofa-enrol-form", async () => {
    const r = await api("POST", "/v1/users/me/two-factor", { password: $("twofa-password").value });
    $("twofa-password").value = "";
    // The server drew the QR code; shown as an image, nothing is fetched from elsewhere.
    $("twofa-qr").src = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(r.qr_svg)}`;
    $("twofa-secret").textContent = r.secret;
    $("twofa-setup").hidden = false;
    $("twofa-recovery").hidden = true;
    $("twofa-code").focus();
  });
  securityForm("twofa-confirm-form", async () => {
    const r = await api("POST", "/v1/users/me/two-factor/confirm", { code: $("twofa-code").value.trim() });
    $("twofa-code").value = "";
    $("twofa-setup").hidden = true;
    $("twofa-secret").textContent = "";
    $("twofa-qr").removeAttribute("src");
    showRecoveryCodes(r.recovery_codes);
    return "Two-factor login is on.";
  });
  securityForm("twofa-disable-form", async () => {
    await api("POST", "/v1/users/me/two-factor/disable", {
      password: $("twofa-off-password").value,
      code: $("twofa-off-code").value.trim(),
    });
    $("twofa-off-password").value = "";
    $("twofa-off-code").value = "";
    $("twofa-recovery").hidden = true;
    return "Two-factor login is off.";
  });
  securityForm("password-form", async () => {
    const body = { current_password: $("pw-current").value, new_password: $("pw-new").value };
    if (!$("pw-code-row").hidden) body.code = $("pw-code").value.trim();
    await api("POST", "/v1/users/me/password", body);
    for (const f of ["pw-current", "pw-new", "pw-code"]) $(f).value = "";
    if ($("sessions-panel").open) loadSessions();
    return "Password changed; your other sessions were logged out.";
  });
  $("delete-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!confirm("Delete your account? This cannot be undone.")) return;
    const body = { password: $("delete-password").value };
    if (!$("delete-code-row").hidden) body.code = $("delete-code").value.trim();
    try {
      await api("DELETE", "/v1/users/me", body);
      localStorage.removeItem("natter.token");
      location.reload();
    } catch (err) {
      $("security-status").textContent = err.message;
    }
  });
  $("export").addEventListener("click", async () => {
    $("security-status").textContent = "Preparing your data…";
    try {
      const res = await fetch("/v1/users/me/export", {
        headers: { authorization: `Bearer ${state.token}` },
      });
      if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
      const url = URL.createObjectURL(await res.blob());
      const a = document.createElement("a");
      a.href = url;
      a.download = `natter-export-${state.me.username}.ndjson`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      $("security-status").textContent = "Your data was downloaded.";
    } catch (err) {
      $("security-status").textContent = err.message;
    }
  });
}

wire();
wireSessions();
wireProfile();
wireSecurity();
if (state.token) {
  start();
} else {
  $("login").hidden = false;
  $("username").focus();
}
