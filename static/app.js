/*
 * Droid demo page: sign in, create tasks, watch them move live over Socket.IO (/events).
 * Plain JavaScript, no build step. All user and model text is written with textContent.
 *
 * Stable selectors for end-to-end tests
 * -------------------------------------
 * Auth (visible while signed out: #auth-view)
 *   #auth-form            the sign-in / sign-up form
 *   #auth-email           email input
 *   #auth-password        password input
 *   #auth-name            name input (optional, used by "Create account")
 *   #signin-btn           POST /auth/login
 *   #signup-btn           POST /auth/register
 * Header (visible while signed in: #session-status)
 *   #conn-pill            connection pill; attribute data-state = connecting|live|reconnecting|offline
 *   #conn-state           text: "connecting" | "live" | "reconnecting" | "offline"
 *   #conn-count           text like "1 tab open" / "2 tabs open" (connections.count)
 *   #user-email           the signed-in user's email
 *   #signout-btn          sign out
 * Composer (visible while signed in: #app-view)
 *   #task-form            the form
 *   #task-prompt          prompt textarea
 *   #task-agent           agent <select> (options from GET /agents; value = agent id)
 *   #task-priority        priority <select>: low | normal | high | urgent
 *   #task-submit          POST /tasks
 *   #form-error           inline REST error ({statusCode, error, message}) of the form in view
 *                         (it sits in the sign-in card while signed out, in the composer once signed in);
 *                         hidden when there is no error; a <p>, or one <li> per message when there are several
 * Board
 *   #board                the board; columns [data-column="pending|processing|done"]
 *   #list-pending, #list-processing, #list-done   the <ul> of each column
 *   #count-pending, #count-processing, #count-done
 *   [data-task-id="<id>"] a task card (<li>), attribute data-status = pending|processing|completed|failed|cancelled,
 *                         data-retry-count = retryCount. Only task cards carry data-status, so
 *                         [data-task-id][data-status="completed"] or [data-status="completed"] both work.
 *     .status-chip        status text (its colour comes from data-chip)
 *     .retry-badge        "retry N" while pending/processing with retryCount N > 0 (after task.pending);
 *                         "N retries" on a failed task
 *     .task-prompt        the prompt
 *     .task-response      the answer (grows with task.progress deltas; full text on task.completed);
 *                         its box (.task-response-wrap) is hidden while there is no text
 *     .task-expand        "Show more" for a long answer
 *     .task-error         the error (failed, or last error before a retry)
 *     .task-cancel        cancel button (only for pending / processing)
 *   #load-more            loads the next page of GET /tasks when there is a nextCursor
 * Developer panel
 *   #event-panel          <details> with the raw stream
 *   #event-log            <ol>, newest first; each <li class="ev" data-event="<name>" data-seq="<seq>">
 *                         holds .ev-name, .ev-seq, .ev-time and .ev-json (the payload as received);
 *                         local connection notes (connect, disconnect, connect_error) are li.ev.ev-local
 *   #event-hide-generic, #event-hide-progress, #event-pause, #event-clear   its controls
 *   #event-count          number of entries
 * Settings panel (static/settings.js lists its selectors)
 *   #settings-panel       <details> with API keys and webhook endpoints
 * Other
 *   #announcer            aria-live region announcing status changes
 *   #toast                short notices (e.g. a cancel that came too late)
 *
 * Storage: localStorage 'droid.token' (the JWT) and 'droid.user'.
 * Global for debugging / tests: window.droid = { state, socket(), reload() }.
 */
(function () {
  'use strict';

  var TOKEN_KEY = 'droid.token';
  var USER_KEY = 'droid.user';
  var STATUSES = ['pending', 'processing', 'completed', 'failed', 'cancelled'];
  var TERMINAL = { completed: true, failed: true, cancelled: true };
  var RANK = { pending: 0, processing: 1, completed: 2, failed: 2, cancelled: 2 };
  var MAX_LOG = 500;

  // ------------------------------------------------------------------ state
  var state = {
    token: null,
    user: null,
    tasks: new Map(),      // id -> task (plus client-side fields _stream, _streaming)
    agents: [],
    agentNames: new Map(),
    lastSeq: null,         // highest envelope seq seen for this user
    nextCursor: null,
    conn: 'offline',
    count: null,
    loadingTasks: null,
    fetchingTask: new Set()
  };
  var socket = null;
  var reconnectTimer = null;
  var generation = 0;      // bumps on every sign-in / sign-out; stale async results are dropped

  // ------------------------------------------------------------------ dom
  function $(sel, root) { return (root || document).querySelector(sel); }
  var el = {
    authView: $('#auth-view'),
    appView: $('#app-view'),
    sessionStatus: $('#session-status'),
    authForm: $('#auth-form'),
    authEmail: $('#auth-email'),
    authPassword: $('#auth-password'),
    authName: $('#auth-name'),
    signinBtn: $('#signin-btn'),
    signupBtn: $('#signup-btn'),
    signoutBtn: $('#signout-btn'),
    authErrorSlot: $('#auth-error-slot'),
    taskErrorSlot: $('#task-error-slot'),
    formError: $('#form-error'),
    connPill: $('#conn-pill'),
    connState: $('#conn-state'),
    connCount: $('#conn-count'),
    userEmail: $('#user-email'),
    userAvatar: $('#user-avatar'),
    greeting: $('#greeting'),
    taskForm: $('#task-form'),
    taskPrompt: $('#task-prompt'),
    taskAgent: $('#task-agent'),
    taskPriority: $('#task-priority'),
    taskSubmit: $('#task-submit'),
    promptCount: $('#prompt-count'),
    lists: {
      pending: $('#list-pending'),
      processing: $('#list-processing'),
      done: $('#list-done')
    },
    counts: {
      pending: $('#count-pending'),
      processing: $('#count-processing'),
      done: $('#count-done')
    },
    board: $('#board'),
    boardSummary: $('#board-summary'),
    loadMore: $('#load-more'),
    eventLog: $('#event-log'),
    eventCount: $('#event-count'),
    eventPause: $('#event-pause'),
    eventHideGeneric: $('#event-hide-generic'),
    eventHideProgress: $('#event-hide-progress'),
    eventClear: $('#event-clear'),
    announcer: $('#announcer'),
    toast: $('#toast'),
    template: $('#task-template')
  };

  // ------------------------------------------------------------------ helpers
  function uuid() {
    if (window.crypto && typeof window.crypto.randomUUID === 'function') return window.crypto.randomUUID();
    var b = new Uint8Array(16);
    (window.crypto || window.msCrypto).getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }
  function timeOf(iso) {
    if (!iso) return NaN;
    var t = Date.parse(iso);
    return isNaN(t) ? NaN : t;
  }
  function truncate(s, n) {
    s = String(s == null ? '' : s).replace(/\s+/g, ' ').trim();
    return s.length > n ? s.slice(0, n - 1) + '…' : s;
  }
  function relTime(iso) {
    var t = timeOf(iso);
    if (isNaN(t)) return '';
    var s = Math.round((Date.now() - t) / 1000);
    if (s < 10) return 'just now';
    if (s < 60) return s + ' s ago';
    var m = Math.round(s / 60);
    if (m < 60) return m + ' min ago';
    var h = Math.round(m / 60);
    if (h < 24) return h + ' h ago';
    return new Date(t).toLocaleDateString();
  }
  function clockTime(iso) {
    var d = iso ? new Date(iso) : new Date();
    if (isNaN(d.getTime())) d = new Date();
    function p(n, w) { n = String(n); while (n.length < (w || 2)) n = '0' + n; return n; }
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds()) + '.' + p(d.getMilliseconds(), 3);
  }
  function plural(n, one, many) { return n + ' ' + (n === 1 ? one : many); }
  function columnOf(status) {
    if (status === 'pending') return 'pending';
    if (status === 'processing') return 'processing';
    return 'done';
  }
  function announce(msg) {
    el.announcer.textContent = '';
    // a fresh text node after a tick makes screen readers read repeats too
    setTimeout(function () { el.announcer.textContent = msg; }, 30);
  }
  var toastTimer = null;
  function toast(msg) {
    el.toast.textContent = msg;
    el.toast.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { el.toast.hidden = true; }, 4200);
  }
  function setBusy(btn, busy) {
    btn.disabled = !!busy;
    btn.classList.toggle('is-busy', !!busy);
    if (busy) btn.setAttribute('aria-busy', 'true'); else btn.removeAttribute('aria-busy');
  }

  // ------------------------------------------------------------------ form error
  function showError(err, slot) {
    var box = el.formError;
    if (slot && box.parentNode !== slot) slot.appendChild(box);
    box.classList.remove('is-info');
    while (box.firstChild) box.removeChild(box.firstChild);
    var messages = err && err.messages ? err.messages : [String(err && err.message || err || 'Something went wrong')];
    if (messages.length === 1) {
      var p = document.createElement('p');
      p.textContent = messages[0];
      box.appendChild(p);
    } else {
      var ul = document.createElement('ul');
      messages.forEach(function (m) {
        var li = document.createElement('li');
        li.textContent = m;
        ul.appendChild(li);
      });
      box.appendChild(ul);
    }
    box.hidden = false;
  }
  function showInfo(msg, slot) {
    showError({ messages: [msg] }, slot);
    el.formError.classList.add('is-info');
  }
  function clearError() {
    el.formError.hidden = true;
    el.formError.classList.remove('is-info');
    while (el.formError.firstChild) el.formError.removeChild(el.formError.firstChild);
  }

  // ------------------------------------------------------------------ REST
  function ApiError(status, body, fallback) {
    var msg = body && body.message;
    var list;
    if (Array.isArray(msg)) list = msg.map(String);
    else if (typeof msg === 'string' && msg) list = [msg];
    else if (body && typeof body.error === 'string') list = [body.error];
    else list = [fallback || ('Request failed (' + status + ')')];
    this.status = status;
    this.body = body;
    this.messages = list;
    this.message = list.join('; ');
  }
  ApiError.prototype = Object.create(Error.prototype);

  function api(method, path, body, opts) {
    opts = opts || {};
    var headers = { 'Accept': 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (state.token && !opts.noAuth) headers['Authorization'] = 'Bearer ' + state.token;
    if (opts.headers) Object.keys(opts.headers).forEach(function (k) { headers[k] = opts.headers[k]; });
    var gen = generation;
    return fetch(path, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store'
    }).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        if (text) { try { data = JSON.parse(text); } catch (e) { data = null; } }
        if (!res.ok) {
          var err = new ApiError(res.status, data, res.status >= 500 ? 'The server had a problem (' + res.status + '). Try again.' : null);
          if (res.status === 401 && !opts.noAuth && gen === generation && state.token) {
            signOut('Your session has ended. Please sign in again.');
            err.handled = true;
          }
          throw err;
        }
        return data;
      });
    }, function () {
      throw new ApiError(0, null, 'Cannot reach the server. Check your connection and try again.');
    });
  }

  // ------------------------------------------------------------------ auth
  function saveSession(token, user) {
    state.token = token;
    state.user = user || null;
    try {
      localStorage.setItem(TOKEN_KEY, token);
      if (user) localStorage.setItem(USER_KEY, JSON.stringify(user)); else localStorage.removeItem(USER_KEY);
    } catch (e) { /* private mode: keep it in memory */ }
  }

  function onAuthSubmit(ev) {
    ev.preventDefault();
    var submitter = ev.submitter || document.activeElement;
    var action = submitter && submitter.getAttribute && submitter.getAttribute('data-action') === 'register' ? 'register' : 'login';
    authenticate(action);
  }

  function authenticate(action) {
    clearError();
    var email = el.authEmail.value.trim();
    var password = el.authPassword.value;
    var name = el.authName.value.trim();
    var body = { email: email, password: password };
    if (action === 'register' && name) body.name = name;
    var btn = action === 'register' ? el.signupBtn : el.signinBtn;
    setBusy(btn, true);
    el.authEmail.removeAttribute('aria-invalid');
    el.authPassword.removeAttribute('aria-invalid');
    api('POST', action === 'register' ? '/auth/register' : '/auth/login', body, { noAuth: true })
      .then(function (res) {
        if (!res || !res.accessToken) throw new ApiError(500, null, 'The server answered without a token.');
        el.authPassword.value = '';
        startSession(res.accessToken, res.user || null, true);
      })
      .catch(function (err) {
        if (err.status === 400 || err.status === 401 || err.status === 409) {
          var text = err.message.toLowerCase();
          if (text.indexOf('email') >= 0 || err.status === 409) el.authEmail.setAttribute('aria-invalid', 'true');
          if (text.indexOf('password') >= 0) el.authPassword.setAttribute('aria-invalid', 'true');
        }
        showError(err, el.authErrorSlot);
      })
      .then(function () { setBusy(btn, false); });
  }

  function startSession(token, user, fresh) {
    generation++;
    resetData();
    saveSession(token, user);
    renderSession();
    clearError();
    if (fresh) el.taskPrompt.focus();
    var gen = generation;
    // validate the token and get the user (also fixes a stale cached user)
    api('GET', '/auth/me').then(function (me) {
      if (gen !== generation || !me) return;
      state.user = me;
      try { localStorage.setItem(USER_KEY, JSON.stringify(me)); } catch (e) { /* ignore */ }
      renderSession();
    }).catch(function () { /* a 401 signs out in api(); a network error is shown by the socket state */ });
    loadAgents();
    loadTasks();
    connectSocket();
  }

  function signOut(message) {
    generation++;
    var settings = document.getElementById('settings-panel');
    if (settings) settings.open = false;
    disconnectSocket();
    state.token = null;
    state.user = null;
    try { localStorage.removeItem(TOKEN_KEY); localStorage.removeItem(USER_KEY); } catch (e) { /* ignore */ }
    resetData();
    renderSession();
    clearError();
    if (message) showInfo(message, el.authErrorSlot);
    el.authEmail.focus();
  }

  function resetData() {
    state.tasks.clear();
    state.agents = [];
    state.agentNames.clear();
    state.lastSeq = null;
    state.nextCursor = null;
    state.count = null;
    state.loadingTasks = null;
    state.fetchingTask.clear();
    dedup.clear();
    Object.keys(el.lists).forEach(function (k) {
      var list = el.lists[k];
      while (list.firstChild) list.removeChild(list.firstChild);
    });
    var log = el.eventLog;
    while (log.firstChild) log.removeChild(log.firstChild);
    el.eventCount.textContent = '0';
    el.loadMore.hidden = true;
    renderCounts();
    renderConnCount();
  }

  function renderSession() {
    var signedIn = !!state.token;
    el.authView.hidden = signedIn;
    el.appView.hidden = !signedIn;
    el.sessionStatus.hidden = !signedIn;
    if (signedIn) {
      if (el.formError.parentNode !== el.taskErrorSlot) el.taskErrorSlot.appendChild(el.formError);
      var u = state.user || {};
      el.userEmail.textContent = u.email || '';
      el.userEmail.title = u.email || '';
      var initial = (u.name || u.email || '?').trim().charAt(0).toUpperCase();
      el.userAvatar.textContent = initial || '?';
      el.greeting.textContent = u.name ? 'Hi ' + u.name.split(/\s+/)[0] + ', what should the agent do?' : 'What should the agent do?';
      document.title = 'Droid · live AI tasks';
    } else {
      if (el.formError.parentNode !== el.authErrorSlot) el.authErrorSlot.appendChild(el.formError);
      setConn('offline');
    }
  }

  // ------------------------------------------------------------------ agents
  function loadAgents() {
    var gen = generation;
    return api('GET', '/agents').then(function (list) {
      if (gen !== generation) return;
      var agents = Array.isArray(list) ? list : (list && Array.isArray(list.items) ? list.items : []);
      state.agents = agents;
      state.agentNames.clear();
      agents.forEach(function (a) { if (a && a.id) state.agentNames.set(a.id, a.name || a.id); });
      var prev = el.taskAgent.value;
      while (el.taskAgent.firstChild) el.taskAgent.removeChild(el.taskAgent.firstChild);
      if (!agents.length) {
        var o = document.createElement('option');
        o.value = '';
        o.textContent = 'Default agent';
        el.taskAgent.appendChild(o);
      }
      agents.forEach(function (a) {
        var opt = document.createElement('option');
        opt.value = a.id;
        opt.textContent = a.name || a.id;
        if (a.description) opt.title = a.description;
        el.taskAgent.appendChild(opt);
      });
      if (prev && state.agentNames.has(prev)) el.taskAgent.value = prev;
      // agent names on existing cards
      state.tasks.forEach(function (t) { renderTask(t); });
    }).catch(function (err) {
      if (!err.handled && gen === generation) console.warn('GET /agents failed:', err.message);
    });
  }

  // ------------------------------------------------------------------ tasks: REST
  function loadTasks() {
    if (!state.token) return Promise.resolve();
    var gen = generation;
    var p = api('GET', '/tasks?limit=100').then(function (res) {
      if (gen !== generation) return;
      var items = res && Array.isArray(res.items) ? res.items : (Array.isArray(res) ? res : []);
      items.forEach(function (t) { mergeTask(t, { quiet: true }); });
      // keep the older pages' cursor if we already went further back
      if (state.nextCursor === null || state.nextCursor === undefined) state.nextCursor = res && res.nextCursor || null;
      el.loadMore.hidden = !state.nextCursor;
      renderCounts();
    }).catch(function (err) {
      if (!err.handled && gen === generation) toast('Could not load your tasks: ' + err.message);
    });
    state.loadingTasks = p;
    return p;
  }

  function loadMore() {
    if (!state.nextCursor) return;
    var gen = generation;
    setBusy(el.loadMore, true);
    api('GET', '/tasks?limit=100&cursor=' + encodeURIComponent(state.nextCursor)).then(function (res) {
      if (gen !== generation) return;
      (res && res.items || []).forEach(function (t) { mergeTask(t, { quiet: true }); });
      state.nextCursor = res && res.nextCursor || null;
      el.loadMore.hidden = !state.nextCursor;
      renderCounts();
    }).catch(function (err) {
      if (!err.handled) toast('Could not load older tasks: ' + err.message);
    }).then(function () { setBusy(el.loadMore, false); });
  }

  function fetchTask(id) {
    if (!id || state.fetchingTask.has(id) || !state.token) return;
    state.fetchingTask.add(id);
    var gen = generation;
    api('GET', '/tasks/' + encodeURIComponent(id)).then(function (t) {
      if (gen === generation && t) { mergeTask(t, {}); renderCounts(); }
    }).catch(function () { /* 404: not ours or gone */ }).then(function () { state.fetchingTask.delete(id); });
  }

  function onTaskSubmit(ev) {
    ev.preventDefault();
    if (el.taskSubmit.disabled) return;
    clearError();
    var body = { prompt: el.taskPrompt.value };
    if (el.taskAgent.value) body.agentId = el.taskAgent.value;
    body.priority = el.taskPriority.value || 'normal';
    setBusy(el.taskSubmit, true);
    el.taskPrompt.removeAttribute('aria-invalid');
    var gen = generation;
    api('POST', '/tasks', body, { headers: { 'Idempotency-Key': uuid() } })
      .then(function (task) {
        if (gen !== generation) return;
        if (task && task.id) {
          mergeTask(task, { fresh: true });
          renderCounts();
        }
        el.taskPrompt.value = '';
        updatePromptCount();
        el.taskPrompt.focus();
      })
      .catch(function (err) {
        if (err.handled) return;
        if (err.status === 400 && /prompt/i.test(err.message)) el.taskPrompt.setAttribute('aria-invalid', 'true');
        showError(err, el.taskErrorSlot);
      })
      .then(function () { setBusy(el.taskSubmit, false); });
  }

  function cancelTask(id, btn) {
    setBusy(btn, true);
    var gen = generation;
    api('POST', '/tasks/' + encodeURIComponent(id) + '/cancel').then(function (task) {
      if (gen !== generation) return;
      if (task && task.id) { mergeTask(task, {}); renderCounts(); }
    }).catch(function (err) {
      if (err.handled || gen !== generation) return;
      setBusy(btn, false);
      if (err.status === 409) toast('Too late to cancel: ' + err.message);
      else toast('Could not cancel: ' + err.message);
      fetchTask(id);
    });
  }

  // ------------------------------------------------------------------ tasks: merge
  /*
   * Merge a task snapshot or an event's data into the board. Never moves a task backwards:
   * data older than what we show (updatedAt) is ignored; at the same updatedAt a lower status
   * rank is ignored.
   */
  function mergeTask(data, opts) {
    opts = opts || {};
    var id = data.id || data.taskId;
    if (!id) return null;
    var cur = state.tasks.get(id);
    var isNew = !cur;
    if (cur) {
      var tNew = timeOf(data.updatedAt), tCur = timeOf(cur.updatedAt);
      if (!isNaN(tNew) && !isNaN(tCur)) {
        if (tNew < tCur) return cur;
        if (tNew === tCur && data.status && RANK[data.status] < RANK[cur.status]) return cur;
      } else if (data.status && TERMINAL[cur.status] && !TERMINAL[data.status]) {
        return cur; // no timestamps to compare: never leave a final state
      }
    }
    var prevStatus = cur ? cur.status : null;
    var next = cur ? Object.assign({}, cur) : { _stream: '' };
    Object.keys(data).forEach(function (k) {
      if (k === 'taskId') return;
      if (data[k] !== undefined) next[k] = data[k];
    });
    next.id = id;
    if (!next.status) next.status = 'pending';
    if (prevStatus !== next.status) {
      // a new attempt starts with an empty stream
      if (next.status === 'pending' || next.status === 'processing') next._stream = '';
    }
    state.tasks.set(id, next);
    renderTask(next, { isNew: isNew, moved: !!prevStatus && prevStatus !== next.status, fresh: opts.fresh });
    if (!opts.quiet && prevStatus && prevStatus !== next.status) {
      var what = next.status === 'pending' && next.retryCount ? 'back to pending for retry ' + next.retryCount : next.status;
      announce('Task “' + truncate(next.prompt, 60) + '” is ' + what + '.');
    } else if (!opts.quiet && isNew && opts.fresh) {
      announce('Task created: “' + truncate(next.prompt, 60) + '”, pending.');
    }
    return next;
  }

  function applyProgress(data) {
    var id = data.taskId || data.id;
    var cur = state.tasks.get(id);
    if (!cur) { fetchTask(id); return; }
    if (TERMINAL[cur.status]) return;
    var tNew = timeOf(data.updatedAt), tCur = timeOf(cur.updatedAt);
    if (!isNaN(tNew) && !isNaN(tCur) && tNew < tCur) return;
    if (cur.status === 'pending') {
      // we missed task.processing: a delta means an attempt is running
      cur.status = 'processing';
      cur._stream = '';
    }
    cur._stream = (cur._stream || '') + String(data.delta == null ? '' : data.delta);
    renderTask(cur, {});
  }

  // ------------------------------------------------------------------ rendering
  function cardFor(id) {
    return el.board.querySelector('[data-task-id="' + (window.CSS && CSS.escape ? CSS.escape(id) : String(id).replace(/["\\]/g, '\\$&')) + '"]');
  }

  function insertSorted(list, card, task) {
    var t = timeOf(task.createdAt);
    var children = list.children;
    for (var i = 0; i < children.length; i++) {
      var other = children[i];
      if (other === card) continue;
      var ot = Number(other.getAttribute('data-created')) || 0;
      if (!isNaN(t) && t > ot) { list.insertBefore(card, other); return; }
    }
    list.appendChild(card);
  }

  function renderTask(task, opts) {
    opts = opts || {};
    var card = cardFor(task.id);
    if (!card) {
      card = el.template.content.firstElementChild.cloneNode(true);
      card.setAttribute('data-task-id', task.id);
      card.querySelector('.task-cancel').addEventListener('click', function (e) { cancelTask(task.id, e.currentTarget); });
      card.querySelector('.task-copy').addEventListener('click', function (e) { copyAnswer(task.id, e.currentTarget); });
      card.querySelector('.task-expand').addEventListener('click', function (e) {
        var open = !card.classList.contains('is-expanded');
        card.classList.toggle('is-expanded', open);
        e.currentTarget.setAttribute('aria-expanded', open ? 'true' : 'false');
        e.currentTarget.textContent = open ? 'Show less' : 'Show more';
      });
    }
    var status = task.status;
    var created = timeOf(task.createdAt);
    card.setAttribute('data-created', isNaN(created) ? '0' : String(created));
    card.setAttribute('data-status', status);
    card.setAttribute('data-retry-count', String(task.retryCount || 0));

    var chip = card.querySelector('.status-chip');
    chip.setAttribute('data-chip', status);
    chip.querySelector('.chip-text').textContent = status;

    var retry = card.querySelector('.retry-badge');
    if (task.retryCount > 0 && !TERMINAL[status]) {
      retry.textContent = 'retry ' + task.retryCount;
      retry.hidden = false;
    } else if (task.retryCount > 0 && status === 'failed') {
      retry.textContent = plural(task.retryCount, 'retry', 'retries');
      retry.hidden = false;
    } else {
      retry.hidden = true;
    }

    var prio = card.querySelector('.priority-badge');
    var pr = task.priority || 'normal';
    prio.setAttribute('data-priority', pr);
    prio.textContent = pr;
    prio.title = 'Priority: ' + pr;

    var time = card.querySelector('.task-time');
    if (task.createdAt) {
      time.setAttribute('datetime', task.createdAt);
      time.title = new Date(task.createdAt).toLocaleString();
      time.textContent = relTime(task.createdAt);
    }

    card.querySelector('.task-prompt').textContent = task.prompt || '';
    card.querySelector('.task-prompt').title = truncate(task.prompt, 600);

    // answer: the stored response once completed, else what has streamed so far
    var wrap = card.querySelector('.task-response-wrap');
    var resp = card.querySelector('.task-response');
    var text = '';
    var streaming = false;
    if (status === 'completed') text = task.response || '';
    else if (status === 'processing') { text = task._stream || ''; streaming = true; }
    else if ((status === 'cancelled' || status === 'failed') && task._stream) text = task._stream;
    var label = card.querySelector('.task-response-label');
    label.textContent = status === 'completed' ? 'Answer' : (status === 'processing' ? 'Answer · writing…' : 'Partial answer');
    if (resp.textContent !== text) {
      var atBottom = resp.scrollHeight - resp.scrollTop - resp.clientHeight < 24;
      resp.textContent = text;
      if (streaming && atBottom) resp.scrollTop = resp.scrollHeight;
    }
    resp.setAttribute('data-streaming', streaming ? 'true' : 'false');
    wrap.hidden = !(text || streaming);

    var errEl = card.querySelector('.task-error');
    var errText = '';
    if (status === 'failed') errText = task.error || 'The task failed.';
    else if ((status === 'pending' || status === 'processing') && task.retryCount > 0 && task.error) errText = 'Last attempt failed: ' + task.error;
    errEl.textContent = errText;
    errEl.hidden = !errText;

    card.querySelector('.task-agent').textContent = task.agentId ? (state.agentNames.get(task.agentId) || '') : '';
    var meta = [];
    if (status === 'completed') {
      if (typeof task.executionTimeMs === 'number') meta.push((task.executionTimeMs / 1000).toFixed(task.executionTimeMs < 10000 ? 1 : 0) + ' s');
      if (typeof task.tokensUsed === 'number') meta.push(plural(task.tokensUsed, 'token', 'tokens'));
    }
    card.querySelector('.task-meta').textContent = meta.join(' · ');

    var cancel = card.querySelector('.task-cancel');
    var cancellable = status === 'pending' || status === 'processing';
    if (cancel.hidden === cancellable) { cancel.hidden = !cancellable; }
    if (!cancellable) setBusy(cancel, false);
    cancel.setAttribute('aria-label', 'Cancel task: ' + truncate(task.prompt, 60));
    var copy = card.querySelector('.task-copy');
    copy.hidden = !(status === 'completed' && task.response && navigator.clipboard);
    copy.setAttribute('aria-label', 'Copy answer of task: ' + truncate(task.prompt, 60));

    // column
    var list = el.lists[columnOf(status)];
    if (card.parentNode !== list) {
      var hadFocus = card.contains(document.activeElement);
      insertSorted(list, card, task);
      if (hadFocus) {
        var f = card.querySelector('.task-cancel:not([hidden])') || card;
        f.focus({ preventScroll: true });
      }
    }
    scheduleOverflowCheck(card);
    if (opts.isNew && opts.fresh) { card.classList.remove('is-new'); void card.offsetWidth; card.classList.add('is-new'); }
    else if (opts.moved) { card.classList.remove('is-moved'); void card.offsetWidth; card.classList.add('is-moved'); }
  }

  // "Show more" only for answers taller than their box; a scrollable answer is focusable
  var overflowQueue = new Set();
  var overflowFrame = 0;
  function scheduleOverflowCheck(card) {
    overflowQueue.add(card);
    if (!overflowFrame) overflowFrame = requestAnimationFrame(flushOverflowChecks);
  }
  function flushOverflowChecks() {
    overflowFrame = 0;
    var cards = Array.from(overflowQueue);
    overflowQueue.clear();
    cards.forEach(checkOverflow);
  }
  function checkOverflow(card) {
    var resp = card.querySelector('.task-response');
    var btn = card.querySelector('.task-expand');
    if (!resp || !btn || !card.isConnected) return;
    var expanded = card.classList.contains('is-expanded');
    var overflowing = resp.scrollHeight > resp.clientHeight + 2;
    var streaming = resp.getAttribute('data-streaming') === 'true';
    btn.hidden = streaming || !(overflowing || expanded);
    if (overflowing) resp.setAttribute('tabindex', '0'); else resp.removeAttribute('tabindex');
  }
  var resizeTimer = null;
  window.addEventListener('resize', function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      Array.prototype.forEach.call(el.board.querySelectorAll('.task-card'), scheduleOverflowCheck);
    }, 150);
  });

  function renderCounts() {
    var n = { pending: 0, processing: 0, done: 0 };
    var by = { completed: 0, failed: 0, cancelled: 0 };
    state.tasks.forEach(function (t) {
      n[columnOf(t.status)]++;
      if (by[t.status] !== undefined) by[t.status]++;
    });
    Object.keys(n).forEach(function (k) {
      el.counts[k].textContent = String(n[k]);
      el.counts[k].setAttribute('aria-label', plural(n[k], 'task', 'tasks'));
    });
    var total = state.tasks.size;
    var parts = [plural(total, 'task', 'tasks')];
    if (by.completed) parts.push(by.completed + ' completed');
    if (by.failed) parts.push(by.failed + ' failed');
    if (by.cancelled) parts.push(by.cancelled + ' cancelled');
    el.boardSummary.textContent = total ? parts.join(' · ') : 'No tasks yet: write a prompt above and watch it move.';
  }

  function copyAnswer(id, btn) {
    var t = state.tasks.get(id);
    if (!t || !t.response || !navigator.clipboard) return;
    navigator.clipboard.writeText(t.response).then(function () {
      btn.textContent = 'Copied';
      setTimeout(function () { btn.textContent = 'Copy'; }, 1500);
    }, function () { toast('Could not copy to the clipboard.'); });
  }

  // ------------------------------------------------------------------ connection state
  var CONN_LABEL = { connecting: 'connecting', live: 'live', reconnecting: 'reconnecting', offline: 'offline' };
  function setConn(s) {
    if (state.conn === s) return;
    var was = state.conn;
    state.conn = s;
    el.connPill.setAttribute('data-state', s);
    el.connState.textContent = CONN_LABEL[s];
    el.connPill.title = s === 'live' ? 'Live: updates arrive the moment they happen'
      : s === 'offline' ? 'Offline: not receiving live updates'
      : s === 'reconnecting' ? 'Connection lost, reconnecting…' : 'Connecting to live updates…';
    if (state.token && was !== s && (s === 'live' && (was === 'reconnecting' || was === 'offline') || s === 'reconnecting' || s === 'offline')) {
      announce(s === 'live' ? 'Live updates reconnected.' : s === 'offline' ? 'Live updates offline.' : 'Connection lost, reconnecting.');
    }
  }
  function renderConnCount() {
    var c = state.count;
    el.connCount.textContent = typeof c === 'number' && c > 0 ? (c === 1 ? '1 tab open' : c + ' tabs open') : '';
  }

  // ------------------------------------------------------------------ socket
  // One handler per envelope, even though the server sends each twice (the specific event and
  // task.event, same envelope): an arrival on one channel cancels its twin from the other one.
  var dedup = {
    map: new Map(),
    clear: function () { this.map.clear(); },
    seen: function (channel, key) {
      var list = this.map.get(key);
      if (list) {
        for (var i = 0; i < list.length; i++) {
          if (list[i] !== channel) { list.splice(i, 1); if (!list.length) this.map.delete(key); return true; }
        }
        list.push(channel);
      } else {
        this.map.set(key, [channel]);
        if (this.map.size > 2000) this.map.delete(this.map.keys().next().value);
      }
      return false;
    }
  };

  function connectSocket() {
    disconnectSocket();
    if (typeof window.io !== 'function') {
      setConn('offline');
      toast('The Socket.IO client did not load: live updates are off.');
      return;
    }
    setConn(navigator.onLine === false ? 'offline' : 'connecting');
    var gen = generation;
    var s = window.io(location.origin + '/events', {
      // a function so that every (re)connection sends the current token and the last seq seen
      auth: function (cb) {
        var a = { token: state.token };
        if (typeof state.lastSeq === 'number') a.lastSeq = state.lastSeq;
        cb(a);
      },
      transports: ['websocket', 'polling'],
      reconnectionDelay: 800,
      reconnectionDelayMax: 8000
    });
    socket = s;

    s.on('connect', function () {
      if (gen !== generation) return;
      clearTimeout(reconnectTimer);
      setConn('live');
      logLocal('connect', { id: s.id, transport: s.io.engine && s.io.engine.transport && s.io.engine.transport.name });
      // never stale: refetch after every (re)connection
      loadTasks();
      if (!state.agents.length) loadAgents();
    });
    s.on('disconnect', function (reason) {
      if (gen !== generation) return;
      logLocal('disconnect', { reason: reason });
      state.count = null;
      renderConnCount();
      if (reason === 'io client disconnect') { setConn('offline'); return; }
      if (s.active) { setConn(navigator.onLine === false ? 'offline' : 'reconnecting'); return; }
      // the server closed it (e.g. a slow client): come back after a pause and resume with lastSeq
      setConn('reconnecting');
      scheduleReconnect(s, 1500);
    });
    s.on('connect_error', function (err) {
      if (gen !== generation) return;
      var msg = err && err.message || 'connect_error';
      logLocal('connect_error', { message: msg, data: err && err.data || null });
      if (msg === 'Token expired' || msg === 'Invalid token' || msg === 'Authentication required') {
        signOut(msg === 'Token expired' ? 'Your session expired. Please sign in again.' : 'Your session is no longer valid. Please sign in again.');
        return;
      }
      if (s.active) {
        setConn(navigator.onLine === false ? 'offline' : (state.conn === 'connecting' ? 'connecting' : 'reconnecting'));
      } else {
        // refused by the server (e.g. "Too many connections"): the client will not retry by itself
        setConn('offline');
        if (msg === 'Too many connections') toast('Too many Droid tabs open: close some and this one reconnects.');
        scheduleReconnect(s, 10000);
      }
    });
    s.io.on('reconnect_attempt', function () {
      if (gen === generation && state.conn !== 'live') setConn(navigator.onLine === false ? 'offline' : 'reconnecting');
    });

    s.onAny(function (name) {
      if (gen !== generation) return;
      var payload = arguments.length > 1 ? arguments[1] : undefined;
      var ack = arguments.length > 2 && typeof arguments[arguments.length - 1] === 'function' ? arguments[arguments.length - 1] : null;
      logEvent(name, payload);
      try { dispatch(name, payload); } catch (e) { console.error('Droid: could not handle', name, e); }
      if (ack) { try { ack({ ok: true }); } catch (e) { /* ignore */ } }
    });
  }

  function scheduleReconnect(s, delay) {
    clearTimeout(reconnectTimer);
    var gen = generation;
    reconnectTimer = setTimeout(function () {
      if (gen === generation && socket === s && !s.connected && state.token) {
        setConn('reconnecting');
        s.connect();
      }
    }, delay);
  }

  function disconnectSocket() {
    clearTimeout(reconnectTimer);
    if (socket) {
      var s = socket;
      socket = null;
      s.offAny();
      s.removeAllListeners();
      s.io.removeAllListeners && s.io.removeAllListeners('reconnect_attempt');
      s.disconnect();
    }
    state.count = null;
    renderConnCount();
  }

  function dispatch(name, payload) {
    switch (name) {
      case 'connected':
        setConn('live');
        return;
      case 'connections.count': {
        var c = payload && (typeof payload.count === 'number' ? payload.count : payload.data && payload.data.count);
        if (typeof c === 'number') { state.count = c; renderConnCount(); }
        return;
      }
      case 'auth.expired':
        signOut('Your session expired. Please sign in again.');
        return;
      case 'auth.revoked':  // a page signed in with an API key that was revoked
        signOut('Your API key was revoked.');
        return;
      case 'webhook.disabled':  // the settings panel (settings.js) shows it
        window.dispatchEvent(new CustomEvent('droid:webhook.disabled', { detail: payload }));
        return;
      case 'resync':
        state.lastSeq = null;
        loadTasks();
        return;
      case 'error':
        if (payload && payload.message) console.warn('Droid socket error:', payload.message);
        return;
    }
    if (name.indexOf('task.') !== 0 || !payload || typeof payload !== 'object') return;
    var env = payload;
    var data = env.data && typeof env.data === 'object' ? env.data : null;
    if (!data) return;
    var evName = name === 'task.event' ? (env.event || '') : name;
    if (typeof env.seq === 'number' && (state.lastSeq === null || env.seq > state.lastSeq)) state.lastSeq = env.seq;
    var key = typeof env.seq === 'number' ? 'seq:' + env.seq + ':' + evName : JSON.stringify(env);
    if (dedup.seen(name === 'task.event' ? 'generic' : 'specific', key)) return;
    handleTaskEvent(evName, data);
  }

  function handleTaskEvent(evName, data) {
    var id = data.taskId || data.id;
    if (!id) return;
    if (evName === 'task.progress') { applyProgress(data); return; }
    var known = state.tasks.has(id);
    var patch = Object.assign({}, data);
    if (!patch.status) {
      var implied = evName.slice(5);
      if (STATUSES.indexOf(implied) >= 0) patch.status = implied;
    }
    if (!known && evName !== 'task.created' && !patch.prompt) {
      // we do not know this task yet (created before we loaded): show it now, complete it over REST
      mergeTask(patch, {});
      fetchTask(id);
    } else {
      mergeTask(patch, { fresh: evName === 'task.created' && !known });
    }
    renderCounts();
  }

  // ------------------------------------------------------------------ developer event log
  var logTotal = 0;
  function addLogEntry(name, seq, ts, json, local, inner) {
    if (el.eventPause.checked) return;
    var li = document.createElement('li');
    li.className = 'ev' + (local ? ' ev-local' : '');
    li.setAttribute('data-event', name);
    if (inner) li.setAttribute('data-inner-event', inner);
    if (seq !== null && seq !== undefined) li.setAttribute('data-seq', String(seq));
    var head = document.createElement('div');
    head.className = 'ev-head';
    var n = document.createElement('span');
    n.className = 'ev-name';
    n.textContent = name;
    var s = document.createElement('span');
    s.className = 'ev-seq';
    s.textContent = seq !== null && seq !== undefined ? 'seq ' + seq : '';
    var t = document.createElement('time');
    t.className = 'ev-time';
    if (ts) t.setAttribute('datetime', ts);
    t.textContent = clockTime(ts);
    t.title = ts || 'received now';
    head.appendChild(n); head.appendChild(s); head.appendChild(t);
    var pre = document.createElement('pre');
    pre.className = 'ev-json';
    pre.textContent = json;
    li.appendChild(head); li.appendChild(pre);
    el.eventLog.insertBefore(li, el.eventLog.firstChild);
    while (el.eventLog.children.length > MAX_LOG) el.eventLog.removeChild(el.eventLog.lastChild);
    logTotal++;
    el.eventCount.textContent = String(el.eventLog.children.length);
  }
  function logEvent(name, payload) {
    var seq = payload && typeof payload === 'object' && typeof payload.seq === 'number' ? payload.seq : null;
    var ts = payload && typeof payload === 'object' && typeof payload.timestamp === 'string' ? payload.timestamp : null;
    var json;
    try { json = JSON.stringify(payload, null, 2); } catch (e) { json = String(payload); }
    if (json === undefined) json = '';
    var inner = payload && typeof payload === 'object' && typeof payload.event === 'string' ? payload.event : null;
    addLogEntry(name, seq, ts, json, false, inner);
  }
  function logLocal(name, info) {
    addLogEntry('⟂ ' + name, null, null, JSON.stringify(info), true);
  }

  // ------------------------------------------------------------------ wiring
  function updatePromptCount() {
    el.promptCount.textContent = el.taskPrompt.value.length.toLocaleString();
  }

  el.authForm.addEventListener('submit', onAuthSubmit);
  el.taskForm.addEventListener('submit', onTaskSubmit);
  el.signoutBtn.addEventListener('click', function () { signOut(null); });
  el.loadMore.addEventListener('click', loadMore);
  el.taskPrompt.addEventListener('input', function () {
    updatePromptCount();
    el.taskPrompt.removeAttribute('aria-invalid');
  });
  el.taskPrompt.addEventListener('keydown', function (e) {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if (el.taskForm.requestSubmit) el.taskForm.requestSubmit(el.taskSubmit); else el.taskSubmit.click();
    }
  });
  Array.prototype.forEach.call(document.querySelectorAll('[data-suggest]'), function (b) {
    b.addEventListener('click', function () {
      el.taskPrompt.value = b.getAttribute('data-suggest');
      updatePromptCount();
      el.taskPrompt.focus();
    });
  });
  el.eventClear.addEventListener('click', function () {
    while (el.eventLog.firstChild) el.eventLog.removeChild(el.eventLog.firstChild);
    el.eventCount.textContent = '0';
  });
  el.eventHideGeneric.addEventListener('change', function () {
    el.eventLog.classList.toggle('hide-generic', el.eventHideGeneric.checked);
  });
  el.eventHideProgress.addEventListener('change', function () {
    el.eventLog.classList.toggle('hide-progress', el.eventHideProgress.checked);
  });

  window.addEventListener('offline', function () { if (state.token) setConn('offline'); });
  window.addEventListener('online', function () {
    if (!state.token || !socket) return;
    if (socket.connected) setConn('live');
    else { setConn('reconnecting'); if (!socket.active) socket.connect(); }
  });
  // another tab signed in or out
  window.addEventListener('storage', function (e) {
    if (e.key !== TOKEN_KEY) return;
    if (!e.newValue && state.token) signOut('You signed out in another tab.');
    else if (e.newValue && e.newValue !== state.token) {
      var u = null;
      try { u = JSON.parse(localStorage.getItem(USER_KEY) || 'null'); } catch (err) { u = null; }
      startSession(e.newValue, u, false);
    }
  });
  // relative times
  setInterval(function () {
    Array.prototype.forEach.call(document.querySelectorAll('.task-time[datetime]'), function (t) {
      t.textContent = relTime(t.getAttribute('datetime'));
    });
  }, 30000);

  window.droid = {
    state: state,
    socket: function () { return socket; },
    reload: function () { return loadTasks(); }
  };

  // true only when the token is a JWT whose exp has passed (the server decides everything else)
  function tokenExpired(token) {
    try {
      var part = String(token).split('.')[1];
      if (!part) return false;
      part = part.replace(/-/g, '+').replace(/_/g, '/');
      while (part.length % 4) part += '=';
      var claims = JSON.parse(atob(part));
      return typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now();
    } catch (e) {
      return false;
    }
  }

  // ------------------------------------------------------------------ boot
  (function boot() {
    var token = null, user = null;
    try {
      token = localStorage.getItem(TOKEN_KEY);
      user = JSON.parse(localStorage.getItem(USER_KEY) || 'null');
    } catch (e) { token = null; }
    updatePromptCount();
    renderCounts();
    if (token && tokenExpired(token)) {
      signOut('Your session expired. Please sign in again.');
    } else if (token) {
      startSession(token, user, false);
    } else {
      renderSession();
    }
  })();
})();
