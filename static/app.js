// The node's page: plain JavaScript, no build step, nothing loaded from elsewhere (Content-Security-Policy:
// default-src 'self'). It uses the node's public API only, the one /openapi.json documents and Postman calls,
// with the API key the user typed (sent as X-API-Key, and kept in sessionStorage for this tab once the node has
// let a request with it through), and shows the API's own error messages.
"use strict";

const KEY_STORE = "emr-chain-api-key";
const BLOCKS_SHOWN = 20;
const state = { identity: null, signed: false, role: "", chain: [], shown: BLOCKS_SHOWN, members: new Map(), problemBlock: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// -- talking to the node --------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A key just typed is tried before it is kept: a wrong one must not stay in the tab's storage.
let typedKey = null;

function currentKey() {
  return typedKey !== null ? typedKey : sessionStorage.getItem(KEY_STORE);
}

function keyHeaders(key) {
  return key ? { "X-API-Key": key } : {};
}

// What the node's answer says of the key a request carried: kept once a request with it succeeded, dropped
// (stored or typed) on a 401, so the page asks again.
function keyAnswered(key, status) {
  if (!key) return;
  if (status === 401) {
    if (typedKey === key) typedKey = null;
    if (sessionStorage.getItem(KEY_STORE) === key) sessionStorage.removeItem(KEY_STORE);
  } else if (status >= 200 && status < 300 && typedKey === key) {
    sessionStorage.setItem(KEY_STORE, key);
    typedKey = null;
  }
}

function forgetKey() {
  typedKey = null;
  sessionStorage.removeItem(KEY_STORE);
}

async function errorOf(response) {
  let message = response.statusText || "error";
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch (_) { /* not JSON: keep the status text */ }
  return new ApiError(response.status, message);
}

// Every request the page makes goes through here (or upload/download below), to a path of the API.
async function api(method, path, body) {
  const key = currentKey();
  const init = { method, headers: keyHeaders(key) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (_) {
    throw new ApiError(0, "the node did not answer: is it running?");
  }
  keyAnswered(key, response.status);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function upload(path, form, progress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const key = currentKey();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(keyHeaders(key))) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress(event.loaded, event.total);
    });
    xhr.upload.addEventListener("load", () => progress(null, null));
    xhr.addEventListener("load", () => {
      keyAnswered(key, xhr.status);
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* keep null */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, (body && body.error) || xhr.statusText || "upload failed"));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the upload was cut off: is the node running?")));
    xhr.send(form);
  });
}

async function download(path) {
  const name = path.split("/").pop();
  const key = currentKey();
  const response = await fetch("/files?path=" + encodeURIComponent(path), { headers: keyHeaders(key) });
  keyAnswered(key, response.status);
  if (!response.ok) throw await errorOf(response);
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// -- what the user sees ---------------------------------------------------------

function notify(message, kind = "error") {
  const notice = $("notice");
  notice.textContent = message;
  notice.className = "notice " + kind;
  notice.hidden = false;
}

function clearNotice() { $("notice").hidden = true; }

function showError(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) askForKey();
    notify(error.status ? `${error.status}: ${error.message}` : error.message);
  } else {
    notify(String(error && error.message || error));
  }
}

// Run an action from a button: the button waits, errors are shown.
async function act(button, action) {
  if (button) button.disabled = true;
  clearNotice();
  try {
    return await action();
  } catch (error) {
    showError(error);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

function askForKey() {
  $("key-form").hidden = false;
  $("key-input").focus();
}

function shortId(nodeId) {
  return nodeId ? `${nodeId.slice(0, 4)}-${nodeId.slice(4, 8)}` : "";
}

function memberLabel(nodeId) {
  const member = state.members.get(nodeId);
  return member ? `${member.role.replace(/_/g, " ")} ${shortId(nodeId)}` : shortId(nodeId);
}

function badge(text, kind) { return el("span", { class: "badge " + kind, text }); }

function bytes(size) {
  const n = Number(size);
  if (!Number.isFinite(n)) return "";
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KB` : `${n} bytes`;
}

// -- the tabs -----------------------------------------------------------------

const loaders = {};

function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.tab === name);
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== "tab-" + name;
  if (loaders[name]) act(null, loaders[name]);
}

// -- the chain ----------------------------------------------------------------

function describeTransaction(tx) {
  const type = tx.type || "record";
  const signer = tx.signer ? el("span", { class: "muted" }, " signed by ", memberLabel(tx.signer)) : null;
  if (type === "record" && tx.ipfs_hash) {
    return el("li", {}, badge("record", "record"), " ", el("strong", { text: tx.EHR_name }), ` for ${tx.user_id}`,
      tx.file_name ? ` — ${tx.file_name}` : "", tx.file_size ? ` (${bytes(tx.file_size)})` : "",
      el("br"), el("code", { class: "cid", text: tx.ipfs_hash }), signer);
  }
  if (type === "grant") return el("li", {}, badge("grant", "grant"), ` ${tx.records.length} record(s) to ${memberLabel(tx.grantee)}`, tx.purpose ? ` for “${tx.purpose}”` : "", signer);
  if (type === "revoke") return el("li", {}, badge("revoke", "revoke"), ` grant ${tx.grant.slice(0, 8)}…`, signer);
  if (type === "access") {
    return el("li", {}, badge(tx.emergency ? "emergency access" : "access", tx.emergency ? "emergency" : "access"),
      ` ${tx.outcome} `, el("code", { class: "cid", text: tx.record }), signer);
  }
  if (type === "admit") return el("li", {}, badge("admit", "member"), ` ${tx.member.role} ${shortId(tx.member.node_id)}`, signer);
  if (type === "remove") return el("li", {}, badge("remove", "member"), ` ${shortId(tx.node_id)}`, signer);
  return el("li", {}, badge(type, "other"), signer);
}

function blockValidity(index) {
  if (state.problemBlock === null) return badge("valid", "ok");
  if (index < state.problemBlock) return badge("valid", "ok");
  if (index === state.problemBlock) return badge("invalid", "bad");
  return badge("after an invalid block", "warn");
}

function renderChain() {
  const list = $("blocks");
  list.replaceChildren();
  const newestFirst = state.chain.slice().reverse();
  for (const block of newestFirst.slice(0, state.shown)) {
    const transactions = block.transactions || [];
    const json = el("pre", { class: "json", text: JSON.stringify(block, null, 2) });
    list.append(el("li", { class: "block", "data-index": block.index },
      el("details", {},
        el("summary", {},
          el("strong", { text: `Block ${block.index}` }), " ", blockValidity(block.index), " ",
          el("span", { class: "muted", text: block.timestamp }),
          block.miner ? el("span", { class: "muted" }, " · mined and signed by ", memberLabel(block.miner)) : null,
          el("span", { class: "muted", text: ` · ${transactions.length} transaction(s)` })),
        json),
      transactions.length ? el("ul", { class: "transactions" }, transactions.map(describeTransaction)) : null));
  }
  $("chain-more").hidden = state.chain.length <= state.shown;
}

loaders.chain = async () => {
  const [answer, validity] = await Promise.all([api("GET", "/get_chain"), api("GET", "/is_valid")]);
  state.chain = answer.chain;
  const named = /block (\d+):/.exec(validity.message || "");
  state.problemBlock = validity.valid ? null : (named ? Number(named[1]) : 1);
  $("chain-summary").textContent = `${answer.length} blocks, newest first`;
  $("chain-validity").replaceChildren(validity.valid ? badge("valid chain", "ok") : badge("invalid chain", "bad"), " ", validity.message);
  renderChain();
};

// -- records ------------------------------------------------------------------

function versionCard(version) {
  const open = el("button", { type: "button", class: "open", text: state.signed ? "Open and decrypt" : "Fetch and decrypt" });
  open.addEventListener("click", () => act(open, () => openRecord(version)));
  return el("div", { class: "card version" },
    el("div", {}, el("strong", { text: version.EHR_name }), ` for ${version.user_id} · block ${version.block_index}`),
    el("div", { class: "muted" }, version.Name, version.Size ? ` · ${bytes(version.Size)}` : ""),
    el("code", { class: "cid", text: version.Hash }),
    el("div", { class: "row" }, open));
}

async function search(event) {
  event.preventDefault();
  await act($("search"), async () => {
    $("versions").replaceChildren();
    $("open-result").hidden = true;
    const found = await api("POST", "/get_file_hash", { name: $("search-name").value.trim() });
    $("versions").replaceChildren(...found.versions.map(versionCard));
  });
}

function opened(path, size, message) {
  const result = $("open-result");
  const button = el("button", { type: "button", id: "download", text: `Download ${path.split("/").pop()}` });
  button.addEventListener("click", () => act(button, () => download(path)));
  result.replaceChildren(badge("decrypted", "ok"), ` ${message}: ${path} (${bytes(size)}) `, button);
  result.hidden = false;
}

async function openRecord(version) {
  $("open-result").hidden = true;
  if (state.signed) {
    const emergency = $("open-emergency").checked;
    const answer = await api("POST", "/open_record", {
      record: version.Hash, purpose: $("open-purpose").value, emergency, reason: emergency ? $("open-reason").value : "",
    });
    opened(answer.path, answer.size, answer.emergency ? "Opened in an emergency (recorded)" : "Opened with a grant");
    return;
  }
  const password = $("open-password").value;
  if (!password) throw new Error("type the password the patient shared first");
  const fetched = await api("POST", "/get_file", { ipfs_hash: version.Hash });
  const decrypted = await api("POST", "/decrypt_file", { file_path: fetched.path, password, overwrite: true });
  opened(decrypted.file_path, decrypted.size, "Fetched from IPFS and decrypted");
}

async function publish(event) {
  event.preventDefault();
  const bar = $("publish-progress");
  const result = $("publish-result");
  await act($("publish"), async () => {
    result.hidden = true;
    const file = $("publish-file").files[0];
    if (!file) throw new Error("choose a file first");
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("EHR_name", $("publish-ehr").value.trim());
    form.append("user_id", $("publish-user").value.trim());
    if (!state.signed) form.append("password", $("publish-password").value);
    bar.hidden = false;
    bar.value = 0;
    try {
      const answer = await upload("/publish_record", form, (loaded, total) => {
        if (loaded === null) bar.removeAttribute("value"); // sent: now encrypting and adding, no measure of it
        else bar.value = total ? loaded / total : 0;
      });
      let text = `${answer.message}. CID ${answer["IPFS Hash"].Hash}.`;
      if ($("publish-mine").checked) {
        const block = await api("GET", "/mine_block");
        text += ` Mined into block ${block.index}.`;
      }
      result.replaceChildren(badge("recorded", "ok"), " ", text);
      result.hidden = false;
      $("search-name").value = $("publish-ehr").value.trim();
    } finally {
      bar.value = 1;
      bar.hidden = true;
    }
  });
}

// -- consent (signed networks) ---------------------------------------------------------

async function loadMembers() {
  const answer = await api("GET", "/members");
  state.members = new Map(answer.members.map((member) => [member.node_id, member]));
  const select = $("grant-member");
  const mine = state.identity.node_id;
  select.replaceChildren(...answer.members.filter((member) => member.node_id !== mine)
    .map((member) => el("option", { value: member.node_id, text: memberLabel(member.node_id) })));
}

function grantCard(grant, made) {
  const kind = grant.status === "active" ? "ok" : grant.status === "revoked" ? "bad" : "warn";
  const card = el("div", { class: "card grant", "data-grant": grant.grant },
    el("div", {}, badge(grant.status, kind), made ? ` to ${memberLabel(grant.grantee)}` : ` from ${memberLabel(grant.owner)}`,
      grant.purpose ? ` for “${grant.purpose}”` : "", ` · block ${grant.block}`,
      grant.expires ? ` · expires ${grant.expires}` : "",
      grant.revoked_in_block ? ` · revoked in block ${grant.revoked_in_block}` : ""),
    el("div", {}, grant.records.map((cid) => el("code", { class: "cid", text: cid }))));
  if (made && grant.status === "active") {
    const revoke = el("button", { type: "button", class: "revoke", text: "Revoke" });
    revoke.addEventListener("click", () => act(revoke, async () => {
      await api("POST", "/revoke", { grant: grant.grant });
      if ($("grant-mine").checked) await api("GET", "/mine_block");
      notify("The grant is revoked from the block that holds the revocation.", "info");
      await loaders.consent();
    }));
    card.append(el("div", { class: "row" }, revoke));
  }
  return card;
}

function auditEntry(access) {
  return el("li", { class: access.emergency ? "emergency" : "" },
    el("div", {}, access.emergency ? badge("EMERGENCY", "emergency") : null, " ",
      badge(access.outcome, access.outcome === "opened" ? "ok" : "bad"), " ",
      el("strong", { text: access.EHR_name }), ` by ${memberLabel(access.member)}`),
    el("div", { class: "muted" }, `${access.at} · block ${access.block}`, access.purpose ? ` · purpose “${access.purpose}”` : "",
      access.reason ? ` · ${access.reason}` : ""));
}

loaders.consent = async () => {
  await loadMembers();
  const grants = await api("GET", "/grants");
  const cards = [...grants.made.map((grant) => grantCard(grant, true)), ...grants.received.map((grant) => grantCard(grant, false))];
  $("grants").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted", text: "No grants yet." })]));
  if (state.role === "patient") {
    const audit = await api("GET", "/audit");
    $("audit").replaceChildren(...(audit.accesses.length ? audit.accesses.map(auditEntry)
      : [el("li", { class: "muted", text: "Nobody has opened or asked for your records yet." })]));
  }
};

function chainTime(value) {
  // datetime-local "2027-01-31T23:59" -> the chain's "2027-01-31 23:59:00.000000"
  if (!value) return "";
  const [day, time] = value.split("T");
  const parts = time.split(":");
  return `${day} ${parts[0]}:${parts[1]}:${(parts[2] || "00").padStart(2, "0")}.000000`;
}

async function giveGrant(event) {
  event.preventDefault();
  await act($("grant"), async () => {
    const receipt = await api("POST", "/grant", {
      record: $("grant-record").value.trim(), member: $("grant-member").value, purpose: $("grant-purpose").value,
      expires: chainTime($("grant-expires").value), versions: $("grant-versions").value,
    });
    if ($("grant-mine").checked) await api("GET", "/mine_block");
    notify(`${receipt.message}.`, "info");
    await loaders.consent();
  });
}

// -- the network ---------------------------------------------------------------

loaders.network = async () => {
  const view = await api("GET", "/network");
  $("network-summary").textContent = `${view.nodes.length} node(s), longest chain ${view.longest}`;
  $("nodes").replaceChildren(...view.nodes.map((node) => el("div", { class: "card node" + (node.self ? " self" : "") },
    el("div", {}, el("strong", { text: node.role ? node.role.replace(/_/g, " ") : "unknown role" }),
      node.self ? badge("this node", "info") : null, " ",
      node.reachable ? (node.behind ? badge(`behind by ${node.behind}`, "warn") : badge("up to date", "ok")) : badge("unreachable", "bad"),
      node.member === false ? badge("not a member", "bad") : null),
    el("div", { class: "muted" }, node.url, node.short_id ? ` · id ${node.short_id}` : ""),
    el("div", {}, `chain length ${node.length ?? "?"}`, node.pending ? ` · ${node.pending} pending` : "",
      node.faults ? ` · ${node.faults} fault(s)` : ""),
    node.error ? el("div", { class: "muted", text: node.error }) : null)));
};

// -- start ----------------------------------------------------------------------

function setUp() {
  const { role, short_id: id, security } = state.identity;
  state.role = role;
  state.signed = security === "signed";
  document.body.dataset.role = role;
  document.body.dataset.security = security;
  $("who").replaceChildren(el("strong", { text: role.replace(/_/g, " ") }), ` node ${id} · `,
    state.signed ? badge("signed network", "info") : badge("paper's open network", "info"));
  document.title = `emr-chain · ${role.replace(/_/g, " ")}`;
  const patient = role === "patient";
  $("publish-form").hidden = !patient;
  $("publish-password-label").hidden = state.signed;
  $("publish-password").required = !state.signed;
  $("publish-how").textContent = state.signed
    ? "The file is encrypted with a key of its own, wrapped for you (and the network's emergency members), added to IPFS and recorded, in one request."
    : "The file is encrypted with the password you will share (AES Crypt), added to IPFS and recorded, in one request.";
  $("open-paper").hidden = state.signed;
  $("open-signed").hidden = !state.signed;
  document.querySelector('#tabs [data-tab="consent"]').hidden = !state.signed;
  $("grant-form").hidden = !(state.signed && patient);
  $("audit-panel").hidden = !(state.signed && patient);
}

async function start() {
  try {
    state.identity = await api("GET", "/identity");
  } catch (error) {
    showError(error);
    return;
  }
  $("key-form").hidden = true;
  clearNotice();
  setUp();
  if (state.signed) await act(null, loadMembers);
  const active = document.querySelector("#tabs button.active");
  showTab(active ? active.dataset.tab : "chain");
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  $("key-button").addEventListener("click", askForKey);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) typedKey = key;
    $("key-input").value = "";
    start();
  });
  $("key-forget").addEventListener("click", () => { forgetKey(); notify("The key is forgotten.", "info"); });
  $("chain-refresh").addEventListener("click", (event) => act(event.currentTarget, loaders.chain));
  $("chain-more").addEventListener("click", () => { state.shown += BLOCKS_SHOWN; renderChain(); });
  $("mine").addEventListener("click", (event) => act(event.currentTarget, async () => {
    const block = await api("GET", "/mine_block");
    notify(`${block.message} Block ${block.index}, ${block.transactions.length} transaction(s).`, "info");
    await loaders.chain();
  }));
  $("search-form").addEventListener("submit", search);
  $("publish-form").addEventListener("submit", publish);
  $("grant-form").addEventListener("submit", giveGrant);
  $("grants-refresh").addEventListener("click", (event) => act(event.currentTarget, loaders.consent));
  $("audit-refresh").addEventListener("click", (event) => act(event.currentTarget, loaders.consent));
  $("network-refresh").addEventListener("click", (event) => act(event.currentTarget, loaders.network));
  $("sync").addEventListener("click", (event) => act(event.currentTarget, async () => {
    const answer = await api("GET", "/replace_chain");
    notify(answer.message, "info");
    await loaders.network();
  }));
  start();
});
