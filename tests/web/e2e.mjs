// The web client in a real browser (Debian's chromium through playwright-core), against a
// real `natter serve` this script starts, stops and restarts. Run by tests/web.rs with
// NATTER_BIN (the binary) and SCREENSHOT_DIR; exits non-zero on the first failed check.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { chromium } from "playwright-core";

const BIN = process.env.NATTER_BIN;
const SHOTS = process.env.SCREENSHOT_DIR || "target/web-screenshots";
const WAIT = 15_000;
assert.ok(BIN, "NATTER_BIN names the natter binary");
fs.mkdirSync(SHOTS, { recursive: true });

function step(name) {
  console.log(`-- ${name}`);
}

/// A PNG of w×h pixels (a gradient), built with zlib alone.
function png(w, h) {
  const chunk = (kind, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(kind, "ascii"), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(zlib.crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  const rows = [];
  for (let y = 0; y < h; y++) {
    const row = Buffer.alloc(1 + 3 * w);
    for (let x = 0; x < w; x++) row.set([x * 2, y * 3, 200], 1 + 3 * x);
    rows.push(row);
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", zlib.deflateSync(Buffer.concat(rows))),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

/// RFC 4648 base32 to bytes.
function fromBase32(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0;
  let value = 0;
  const out = [];
  for (const c of text.replace(/[=\s]/g, "").toUpperCase()) {
    const i = alphabet.indexOf(c);
    assert.ok(i >= 0, `base32: ${c}`);
    value = ((value << 5) | i) & 0xfff;
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      out.push((value >> bits) & 0xff);
    }
  }
  return Buffer.from(out);
}

/// The TOTP code (RFC 6238: HMAC-SHA1, 6 digits, 30 s) of `step` under `secret`,
/// computed here, apart from the server's code.
function totp(secret, step) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const mac = crypto.createHmac("sha1", secret).update(counter).digest();
  const offset = mac[19] & 15;
  return String((mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000).padStart(6, "0");
}

function nowStep() {
  return Math.floor(Date.now() / 1000 / 30);
}

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/// Starts `natter serve` and resolves once it listens.
function startServer(dataDir, port) {
  const child = spawn(BIN, ["serve", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir], {
    env: {
      ...process.env,
      NATTER_INSECURE_FAST_PASSWORD_HASH: "1",
      NATTER_SEND_RATE: "1000",
      NATTER_SEND_BURST: "1000",
      NATTER_MEMBERSHIP_CONSENT: "open",
      NATTER_PRESENCE_GRACE_MS: "1000",
      NATTER_LOG: "warn,natter::server=info",
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  return new Promise((resolve, reject) => {
    let log = "";
    const timer = setTimeout(() => reject(new Error(`no listen line: ${log}`)), WAIT);
    child.stderr.on("data", (chunk) => {
      log += chunk;
      if (log.includes("natter listening")) {
        clearTimeout(timer);
        resolve(child);
      }
    });
    child.on("exit", (code) => reject(new Error(`natter exited ${code}: ${log}`)));
  });
}

async function stopServer(child) {
  const exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)));
  child.kill("SIGTERM");
  assert.equal(await exited, 0, "natter drains and exits 0");
}

async function rest(base, token, method, p, body) {
  const res = await fetch(base + p, {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      ...(body ? { "content-type": "application/json" } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  assert.ok(res.ok, `${method} ${p}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function register(page, base, name) {
  await page.goto(base);
  await page.fill("#username", name);
  await page.fill("#password", `password-${name}`);
  await page.click("#register-button");
  await page.waitForSelector("#status:text('online')", { timeout: WAIT });
}

/// The texts of the open channel's messages, in order.
async function texts(page) {
  return page.$$eval("#messages li.message .text", (els) => els.map((e) => e.textContent));
}

async function openChannel(page, name) {
  const button = page.locator(".channel-link", { hasText: name });
  await button.waitFor({ timeout: WAIT });
  await button.click();
  await page.waitForFunction(
    (n) => document.getElementById("channel-title").textContent.includes(n),
    name,
    { timeout: WAIT },
  );
}

async function sendText(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

async function waitText(page, text) {
  await page
    .locator("#messages li.message .text", { hasText: text })
    .first()
    .waitFor({ timeout: WAIT });
}

async function count(page, text) {
  return (await texts(page)).filter((t) => t === text).length;
}

const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "natter-web-"));
const port = await freePort();
const base = `http://127.0.0.1:${port}`;
let server = await startServer(dataDir, port);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
  ],
});

try {
  const a = await (await browser.newContext({ viewport: { width: 1100, height: 700 } })).newPage();
  const b = await (await browser.newContext({ viewport: { width: 1100, height: 700 } })).newPage();
  for (const p of [a, b]) p.on("pageerror", (e) => console.error("page error:", e.message));

  step("the page and its assets come from the binary, with a strict CSP");
  const index = await fetch(base + "/");
  assert.equal(index.status, 200);
  assert.match(index.headers.get("content-security-policy"), /script-src 'self'/);
  assert.equal((await fetch(base + "/app.js")).status, 200);
  await a.goto(base);
  await a.screenshot({ path: path.join(SHOTS, "login.png") });

  step("register two users in two browser contexts");
  await register(a, base, "alice");
  await register(b, base, "bob");

  step("group channel: create, add a member, chat live both ways");
  await a.fill("#new-channel-name", "general");
  await a.press("#new-channel-name", "Enter");
  await a.waitForFunction(() => document.getElementById("channel-title").textContent.includes("general"));
  await a.fill("#add-member-username", "bob");
  await a.press("#add-member-username", "Enter");
  await openChannel(b, "general");
  await sendText(a, "hello bob");
  await waitText(b, "hello bob");
  await sendText(b, "hi alice");
  await waitText(a, "hi alice");
  assert.deepEqual(await texts(a), ["hello bob", "hi alice"]);
  assert.deepEqual(await texts(b), ["hello bob", "hi alice"]);

  step("a reaction added and taken back is seen live on both sides");
  {
    const on = (p) => p.locator("#messages li.message", { hasText: "hello bob" });
    const thumbs = (p) => on(p).locator("button.reaction", { hasText: "👍" });
    await on(b).getByRole("button", { name: "Add a reaction" }).click();
    await on(b).getByRole("button", { name: "React with 👍" }).click();
    await thumbs(a).filter({ hasText: "👍 1" }).waitFor({ timeout: WAIT });
    assert.equal(await thumbs(a).getAttribute("aria-pressed"), "false");
    await thumbs(a).click(); // alice adds hers
    await thumbs(b).filter({ hasText: "👍 2" }).waitFor({ timeout: WAIT });
    await thumbs(a).filter({ hasText: "👍 2" }).waitFor({ timeout: WAIT });
    assert.equal(await thumbs(a).getAttribute("aria-pressed"), "true");
    await thumbs(b).click(); // bob takes his back
    await thumbs(a).filter({ hasText: "👍 1" }).waitFor({ timeout: WAIT });
    await thumbs(b).filter({ hasText: "👍 1" }).waitFor({ timeout: WAIT });
    assert.equal(await thumbs(b).getAttribute("aria-pressed"), "false");
  }

  step("a reply in a thread is seen live by the other side, and counted on its root");
  {
    const root = (p) => p.locator("#messages li.message", { hasText: "hello bob" });
    await root(a).getByRole("button", { name: "Reply in thread" }).click();
    await a.locator("#thread").waitFor({ timeout: WAIT });
    await a.fill("#thread-text", "a threaded answer");
    await a.press("#thread-text", "Enter");
    await a.locator("#thread-messages li.message .text", { hasText: "a threaded answer" }).waitFor({ timeout: WAIT });
    // Bob sees the count on the root, not the reply in the channel's timeline.
    await root(b).getByRole("button", { name: "Open thread: 1 reply" }).waitFor({ timeout: WAIT });
    assert.equal(await count(b, "a threaded answer"), 0);
    await root(b).getByRole("button", { name: "Open thread: 1 reply" }).click();
    await b.locator("#thread-messages li.message .text", { hasText: "a threaded answer" }).waitFor({ timeout: WAIT });
    await b.fill("#thread-text", "and a threaded reply back");
    await b.press("#thread-text", "Enter");
    await a.locator("#thread-messages li.message .text", { hasText: "and a threaded reply back" }).waitFor({ timeout: WAIT });
    await root(a).getByRole("button", { name: "Open thread: 2 replies" }).waitFor({ timeout: WAIT });
    await a.screenshot({ path: path.join(SHOTS, "thread.png") });
    for (const p of [a, b]) {
      await p.click("#thread-close");
      await p.locator("#thread").waitFor({ state: "hidden", timeout: WAIT });
    }
  }

  step("a broadcast channel: the owner posts, a member reads and has no composer");
  await a.fill("#new-channel-name", "news");
  await a.selectOption("#new-channel-kind", "broadcast");
  await a.press("#new-channel-name", "Enter");
  await a.waitForFunction(() => document.getElementById("channel-title").textContent.includes("news"));
  await a.fill("#add-member-username", "bob");
  await a.press("#add-member-username", "Enter");
  await sendText(a, "an announcement");
  await openChannel(b, "news");
  await waitText(b, "an announcement");
  assert.equal(await b.locator("#composer").isHidden(), true, "members of a broadcast cannot post");
  assert.equal(await b.locator("#add-member").isHidden(), true);

  step("a mention raises the other user's mention badge, highlighted; reading clears it");
  await openChannel(a, "general");
  await sendText(a, "ping @Bob, see this");
  const generalLink = b.locator(".channel-link", { hasText: "general" });
  await generalLink.locator(".mention-badge", { hasText: "@1" }).waitFor({ timeout: WAIT });
  assert.equal(await generalLink.locator(".mention-badge").getAttribute("aria-label"), "1 mention of you");
  await openChannel(b, "general");
  await b.locator("#messages li.mentions-me mark.mention", { hasText: "@Bob" }).waitFor({ timeout: WAIT });
  await b.locator(".channel-link .mention-badge").waitFor({ state: "detached", timeout: WAIT });
  await a.locator("#messages li.message strong.mention", { hasText: "@Bob" }).waitFor({ timeout: WAIT });

  step("a profile edited on one side shows live on the other");
  await a.click("#profile-panel summary");
  await a.fill("#profile-name", "Alice Liddell");
  await a.fill("#profile-about", "Down the rabbit hole.");
  await a.click("#profile-form button[type=submit]");
  await a.locator("#profile-status", { hasText: "Saved." }).waitFor({ timeout: WAIT });
  assert.equal(await a.textContent("#me-name"), "Alice Liddell");
  await b
    .locator("#messages li.message .author", { hasText: "Alice Liddell" })
    .first()
    .waitFor({ timeout: WAIT });
  await a.click("#profile-panel summary");

  step("typing indicator");
  // The server passes one typing signal per channel per 1.5 s, and the client sends one
  // every 2 s while keys are pressed: keep typing until bob sees it.
  let seen = false;
  for (let i = 0; i < 20 && !seen; i++) {
    await a.type("#text", "x");
    seen = await b
      .waitForSelector("#typing:text('alice is typing')", { timeout: 500 })
      .then(() => true, () => false);
  }
  assert.ok(seen, "bob sees alice typing");
  await a.fill("#text", "");

  step("a direct message by username, with an unread badge until it is seen");
  await b.fill("#new-dm-username", "alice");
  await b.press("#new-dm-username", "Enter");
  await b.waitForFunction(() => document.getElementById("channel-title").textContent.includes("alice"));
  await sendText(b, "psst");
  await waitText(b, "psst");
  const dm = a.locator(".channel-link", { hasText: "bob" });
  await dm.locator(".badge:text('1')").waitFor({ timeout: WAIT });
  await dm.click();
  await waitText(a, "psst");
  await a.waitForFunction(() => !document.querySelector(".channel-link[aria-current] .badge"));
  await sendText(a, "psst back");
  await waitText(b, "psst back");
  const aliceToken = await a.evaluate(() => localStorage.getItem("natter.token"));
  const bobToken = await b.evaluate(() => localStorage.getItem("natter.token"));
  // The read marker advanced in the store as the message was seen.
  let dmRow;
  for (let i = 0; i < 50; i++) {
    const { channels } = await rest(base, aliceToken, "GET", "/v1/channels");
    dmRow = channels.find((c) => c.kind === "dm");
    if (dmRow.read_seq >= dmRow.last_seq - 1) break; // all but alice's own last message
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(dmRow.unread, 0, "alice has read the DM");
  await a.screenshot({ path: path.join(SHOTS, "chat.png") });

  step("a message that looks like HTML stays text");
  await openChannel(a, "general");
  await openChannel(b, "general");
  const xss = `<img src=x onerror="window.__xss=1">`;
  await sendText(a, xss);
  await waitText(b, xss);
  for (const p of [a, b]) {
    assert.equal(await p.evaluate(() => window.__xss), undefined);
    assert.equal(await p.locator("#messages img").count(), 0);
    assert.equal(await count(p, xss), 1);
  }

  step("edit and delete own messages");
  const mine = a.locator("#messages li.message", { hasText: "hello bob" });
  await mine.getByRole("button", { name: "Edit message" }).click();
  await a.fill("#messages form.edit input", "hello bob, edited");
  await a.press("#messages form.edit input", "Enter");
  await waitText(b, "hello bob, edited");
  const x = a.locator("#messages li.message", { hasText: xss });
  await x.getByRole("button", { name: "Delete message" }).click();
  await b.waitForFunction((t) => ![...document.querySelectorAll("#messages .text")].some((e) => e.textContent === t), xss);
  await waitText(b, "(deleted)");

  step("scrolling up loads older history with no gap and no duplicate");
  const hist = await rest(base, aliceToken, "POST", "/v1/channels", { name: "history", kind: "group", members: [] });
  const sent = [];
  for (let i = 0; i < 137; i++) {
    const t = `h-${String(i).padStart(3, "0")}`;
    sent.push(t);
    await rest(base, aliceToken, "POST", `/v1/channels/${hist.id}/messages`, { text: t, client_id: t });
  }
  await openChannel(a, "history");
  await waitText(a, "h-136");
  assert.equal((await texts(a)).length, 50, "one page at first");
  for (let i = 0; i < 20; i++) {
    const before = (await texts(a)).length;
    if (before === sent.length) break;
    // A real wheel scroll over the list, up to its top.
    await a.hover("#messages");
    await a.mouse.wheel(0, -20000);
    await a.waitForFunction((n) => document.querySelectorAll("#messages li.message").length > n, before, { timeout: WAIT });
  }
  assert.deepEqual(await texts(a), sent, "every message once, in order");
  const seqs = await a.$$eval("#messages li.message", (els) => els.map((e) => Number(e.dataset.seq)));
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y));
  assert.equal(new Set(seqs).size, seqs.length);
  assert.equal(await a.locator("#messages li.more").count(), 0, "nothing older is left");

  step("search finds a message and opens it in its history, older pages loaded");
  await a.reload();
  await a.waitForSelector("#status:text('online')", { timeout: WAIT });
  await a.fill("#search-q", "h-003");
  await a.press("#search-q", "Enter");
  const result = a.locator("#search-results li button");
  await result.first().waitFor({ timeout: WAIT });
  assert.equal(await result.count(), 1, "one message has h-003");
  assert.deepEqual(await result.first().locator("mark").allTextContents(), ["h", "003"]);
  assert.match(await result.first().textContent(), /# history/);
  await result.first().click();
  await a.locator("#messages li.found", { hasText: "h-003" }).waitFor({ timeout: WAIT });
  assert.equal(await a.evaluate(() => document.activeElement.classList.contains("found")), true);
  assert.ok((await texts(a)).includes("h-000"), "the pages up to it are loaded, no gap");
  await a.fill("#search-q", '"unclosed');
  await a.press("#search-q", "Enter");
  await a.locator("#search-status", { hasText: "not closed" }).waitFor({ timeout: WAIT });
  await a.screenshot({ path: path.join(SHOTS, "search.png") });

  step("a message sent while the server restarts arrives exactly once");
  await openChannel(a, "general");
  await stopServer(server);
  for (const p of [a, b]) {
    await p.waitForFunction(() => !document.getElementById("status").textContent.includes("online"), null, { timeout: WAIT });
    await p.locator("#channel-status").waitFor({ state: "visible", timeout: WAIT });
  }
  await a.screenshot({ path: path.join(SHOTS, "offline.png") });
  await sendText(a, "sent while the server was down");
  await a.locator("#messages li.pending", { hasText: "sent while the server was down" }).waitFor();
  server = await startServer(dataDir, port);
  await waitText(b, "sent while the server was down");
  await b.locator("#channel-status").waitFor({ state: "hidden", timeout: WAIT });
  await a.waitForFunction(() => document.querySelectorAll("#messages li.pending").length === 0, null, { timeout: WAIT });
  for (const p of [a, b]) await p.waitForSelector("#status:text('online')", { timeout: WAIT });
  await new Promise((r) => setTimeout(r, 500)); // anything doubled would have come by now
  for (const p of [a, b]) assert.equal(await count(p, "sent while the server was down"), 1);
  const stored = await rest(base, bobToken, "GET", `/v1/channels/${(await rest(base, bobToken, "GET", "/v1/channels")).channels.find((c) => c.name === "general").id}/messages`);
  assert.equal(stored.messages.filter((m) => m.text === "sent while the server was down").length, 1, "one row");
  await sendText(b, "and we are back");
  await waitText(a, "and we are back");
  await a.fill("#text", "and the typing indicator shows on the other side…");
  await b.screenshot({ path: path.join(SHOTS, "general.png") });
  await a.fill("#text", "");

  step("keyboard alone, on a phone-sized window");
  const phone = await (await browser.newContext({ viewport: { width: 390, height: 780 }, isMobile: true })).newPage();
  await phone.goto(base);
  await phone.waitForSelector("#username:focus");
  await phone.keyboard.type("carol");
  await phone.keyboard.press("Tab");
  await phone.keyboard.type("password-carol");
  await phone.keyboard.press("Tab"); // "Log in"
  await phone.keyboard.press("Tab"); // "Create account"
  await phone.keyboard.press("Enter");
  await phone.waitForSelector("#status:text('online')", { timeout: WAIT });
  await phone.locator("#new-channel-name").focus();
  await phone.keyboard.type("phones");
  await phone.keyboard.press("Enter");
  await phone.waitForSelector("#text:focus", { timeout: WAIT });
  await phone.keyboard.type("typed on a phone");
  await phone.keyboard.press("Enter");
  await waitText(phone, "typed on a phone");
  await phone.screenshot({ path: path.join(SHOTS, "phone.png") });
  const labelled = await phone.$$eval("input, select, textarea", (els) =>
    els.filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label")).map((e) => e.id),
  );
  assert.deepEqual(labelled, [], "every control has a label");

  step("sessions: listed with where they came from; another one ended; everywhere else logged out");
  // Alice logs in a second time, in another browser context (another device).
  const a2 = await (await browser.newContext({ viewport: { width: 1100, height: 700 } })).newPage();
  await a2.goto(base);
  await a2.fill("#username", "alice");
  await a2.fill("#password", "password-alice");
  await a2.click("#login-button");
  await a2.waitForSelector("#status:text('online')", { timeout: WAIT });
  await a.click("#sessions-panel summary");
  await a.waitForFunction(() => document.querySelectorAll("#sessions li").length >= 2, null, { timeout: WAIT });
  const rows = await a.$$eval("#sessions li", (els) => els.map((e) => e.textContent));
  assert.ok(rows.some((r) => r.includes("(this session)")), `one row is this session: ${rows}`);
  assert.ok(rows.every((r) => r.includes("127.0.0.1")), `rows show the address: ${rows}`);
  await a.screenshot({ path: path.join(SHOTS, "sessions.png") });
  await a.click("#logout-others");
  // The other device's socket is closed with 4001 and it is back at the login form.
  await a2.waitForSelector("#login:not([hidden])", { timeout: WAIT });
  await a.waitForFunction(() => document.querySelectorAll("#sessions li").length === 1, null, { timeout: WAIT });
  await a.waitForSelector("#status:text('online')", { timeout: WAIT });

  step("an incoming webhook made in the channel's settings posts as a bot, marked as one");
  await a.fill("#new-channel-name", "deploys");
  await a.press("#new-channel-name", "Enter");
  await a.waitForFunction(() => document.getElementById("channel-title").textContent.includes("deploys"));
  await a.fill("#add-member-username", "bob");
  await a.press("#add-member-username", "Enter");
  await a.click("#integrations summary");
  await a.fill("#new-hook-name", "CI");
  await a.click("#new-hook button[type=submit]");
  const shownPath = await a.locator("#new-hook-path:not([hidden])").textContent({ timeout: WAIT });
  const hookUrl = shownPath.match(/https?:\/\/\S+/)[0];
  await a.locator("#hooks li", { hasText: "CI" }).waitFor({ timeout: WAIT });
  const posted = await fetch(hookUrl, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ text: "build 7 passed" }),
  });
  assert.equal(posted.status, 201, await posted.text());
  await openChannel(b, "deploys");
  await waitText(b, "build 7 passed");
  const hookAuthor = b.locator("#messages li.message", { hasText: "build 7 passed" }).locator(".author");
  await hookAuthor.locator(".bot-badge").waitFor({ timeout: WAIT });
  assert.match(await hookAuthor.textContent(), /CI/);
  assert.ok(await b.locator("#integrations").isHidden(), "a plain member has no webhook settings");
  await a.screenshot({ path: path.join(SHOTS, "webhooks.png") });

  step("an image uploaded by the file picker is previewed on the other side and downloads whole");
  await openChannel(a, "general");
  await openChannel(b, "general");
  const picture = png(96, 64);
  const picked = path.join(dataDir, "sunset.png");
  fs.writeFileSync(picked, picture);
  await a.setInputFiles("#file-input", picked);
  await a.locator("#drafts li.ready", { hasText: "sunset.png" }).waitFor({ timeout: WAIT });
  await a.fill("#text", "look at this");
  await a.press("#text", "Enter");
  await waitText(b, "look at this");
  const shown = b.locator("#messages li.message", { hasText: "look at this" });
  const thumb = shown.locator("img.attachment-thumb");
  await thumb.waitFor({ timeout: WAIT });
  await b.waitForFunction(
    () => [...document.querySelectorAll("#messages img.attachment-thumb")].some((i) => i.complete && i.naturalWidth > 0),
    null,
    { timeout: WAIT },
  );
  assert.equal(await thumb.getAttribute("alt"), "sunset.png");
  const [download] = await Promise.all([
    b.waitForEvent("download", { timeout: WAIT }),
    shown.locator("a.download").click(),
  ]);
  assert.equal(download.suggestedFilename(), "sunset.png");
  const saved = await download.path();
  assert.deepEqual(fs.readFileSync(saved), picture);
  assert.equal(await a.locator("#drafts li").count(), 0, "sent files leave the composer");
  await b.screenshot({ path: path.join(SHOTS, "attachments.png") });

  step("presence: the other user shows online, then offline after they close the page");
  await openChannel(a, "general");
  const bobId = (await rest(base, bobToken, "GET", "/v1/users/me")).id;
  const bobRow = a.locator(`#members li[data-user="${bobId}"]`);
  await a.locator(`#members li[data-user="${bobId}"][data-status="online"]`).waitFor({ timeout: WAIT });
  assert.match(await bobRow.textContent(), /online/);
  await b.close();
  await a.locator(`#members li[data-user="${bobId}"][data-status="offline"]`).waitFor({ timeout: WAIT });
  assert.match(await bobRow.textContent(), /offline, last seen/);
  await a.screenshot({ path: path.join(SHOTS, "presence.png") });

  step("two-factor login: enrolled from the settings panel, then needed to log back in");
  {
    await a.click("#security-panel summary");
    await a.locator("#twofa-status", { hasText: "is off" }).waitFor({ timeout: WAIT });
    await a.fill("#twofa-password", "password-alice");
    await a.click("#twofa-enrol-form button[type=submit]");
    await a.locator("#twofa-setup").waitFor({ state: "visible", timeout: WAIT });
    // The QR code is drawn: an image the page shows, made by the server.
    await a.waitForFunction(() => {
      const img = document.getElementById("twofa-qr");
      return img.complete && img.naturalWidth > 0;
    }, null, { timeout: WAIT });
    await a.locator("#twofa-qr").scrollIntoViewIfNeeded();
    await a.screenshot({ path: path.join(SHOTS, "two-factor-setup.png") });
    const secret = fromBase32((await a.textContent("#twofa-secret")).trim());
    assert.equal(secret.length, 20);
    const enrolStep = nowStep();
    await a.fill("#twofa-code", totp(secret, enrolStep));
    await a.click("#twofa-confirm-form button[type=submit]");
    await a.locator("#twofa-recovery-codes li").first().waitFor({ timeout: WAIT });
    assert.equal(await a.locator("#twofa-recovery-codes li").count(), 10);
    await a.locator("#twofa-status", { hasText: "is on" }).waitFor({ timeout: WAIT });
    await a.screenshot({ path: path.join(SHOTS, "two-factor.png") });

    await a.click("#logout");
    await a.locator("#login").waitFor({ state: "visible", timeout: WAIT });
    await a.fill("#username", "alice");
    await a.fill("#password", "password-alice");
    await a.click("#login-button");
    await a.locator("#login-code-row").waitFor({ state: "visible", timeout: WAIT });
    assert.ok(await a.locator("#app").isHidden(), "no session before the code");
    // The enrolment used its step's code: the next step's is accepted (clock skew).
    await a.fill("#login-code", totp(secret, enrolStep + 1));
    await a.press("#login-code", "Enter");
    await a.waitForSelector("#status:text('online')", { timeout: WAIT });
    assert.ok(await a.locator("#login").isHidden());
  }

  console.log(`ok: screenshots in ${SHOTS}`);
} finally {
  await browser.close();
  if (server.exitCode === null && server.signalCode === null) {
    const exited = new Promise((resolve) => server.on("exit", resolve));
    server.kill("SIGTERM");
    await exited;
  }
  fs.rmSync(dataDir, { recursive: true, force: true });
}
