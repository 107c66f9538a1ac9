/*
 * Droid demo page: the settings panel (API keys and webhook endpoints). Plain JavaScript, no build
 * step; it talks to the REST API with the page's session token (window.droid.state.token) and
 * loads when the panel is opened. All server text is written with textContent.
 *
 * Stable selectors for end-to-end tests
 * -------------------------------------
 *   #settings-panel       <details>; opening it loads keys and endpoints
 *   #key-form, #key-name, #key-scope (write | read), #key-create
 *   #key-new              shown after a key is created; #key-new-value holds the key (shown once)
 *   #key-error            the last refusal of a key action
 *   #key-list             <ul>; each key is li[data-key-id] with .key-name, .key-prefix,
 *                         .key-scope, .key-used and button.key-revoke
 *   #hook-form, #hook-url, #hook-events (checkboxes, value = event name), #hook-create
 *   #hook-new             shown after an endpoint is added; #hook-new-secret holds its secret
 *   #hook-error           the last refusal of an endpoint action
 *   #hook-list            <ul>; each endpoint is li[data-endpoint-id][data-enabled="true|false"]
 *                         with .hook-url, .hook-state (text "enabled" or "disabled: reason"),
 *                         buttons .hook-test, .hook-deliveries (show/refresh), .hook-delete, and
 *                         ul.delivery-list of li[data-delivery-id][data-status=pending|succeeded|failed]
 *                         with .delivery-event, .delivery-status, .delivery-attempts
 * The page's socket passes `webhook.disabled` here (event droid:webhook.disabled on window).
 */
(function () {
  'use strict';

  function $(sel) { return document.querySelector(sel); }
  var el = {
    panel: $('#settings-panel'),
    keyForm: $('#key-form'), keyName: $('#key-name'), keyScope: $('#key-scope'),
    keyCreate: $('#key-create'), keyNew: $('#key-new'), keyNewValue: $('#key-new-value'),
    keyError: $('#key-error'), keyList: $('#key-list'),
    hookForm: $('#hook-form'), hookUrl: $('#hook-url'), hookEvents: $('#hook-events'),
    hookCreate: $('#hook-create'), hookNew: $('#hook-new'), hookNewSecret: $('#hook-new-secret'),
    hookError: $('#hook-error'), hookList: $('#hook-list'), toast: $('#toast')
  };
  if (!el.panel) return;
  var shown = {};          // endpoint id -> true while its deliveries are shown
  var refreshTimers = {};  // endpoint id -> timer while some delivery is pending

  function token() { return window.droid && window.droid.state && window.droid.state.token; }

  function call(method, path, body) {
    var headers = { 'Accept': 'application/json', 'Authorization': 'Bearer ' + token() };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    return fetch(path, {
      method: method, headers: headers, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        if (text) { try { data = JSON.parse(text); } catch (e) { data = null; } }
        if (!res.ok) {
          var msg = data && data.message;
          throw new Error(Array.isArray(msg) ? msg.join('; ') : (msg || 'Request failed (' + res.status + ')'));
        }
        return data;
      });
    }, function () { throw new Error('Cannot reach the server.'); });
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function span(cls, text) {
    var s = document.createElement('span');
    s.className = cls;
    s.textContent = text;
    return s;
  }
  function button(cls, text, onClick) {
    var b = document.createElement('button');
    b.type = 'button';
    b.className = 'btn btn-xs ' + cls;
    b.textContent = text;
    b.addEventListener('click', onClick);
    return b;
  }
  function fail(box, err) { box.textContent = err.message; box.hidden = false; }
  function ok(box) { box.hidden = true; box.textContent = ''; }
  function when(iso) { return iso ? new Date(iso).toLocaleString() : 'never'; }
  function note(msg) {
    if (!el.toast) return;
    el.toast.textContent = msg;
    el.toast.hidden = false;
    setTimeout(function () { el.toast.hidden = true; }, 4200);
  }

  // ------------------------------------------------------------------ API keys
  function loadKeys() {
    return call('GET', '/api-keys').then(renderKeys, function (err) { fail(el.keyError, err); });
  }
  function renderKeys(keys) {
    clear(el.keyList);
    (keys || []).forEach(function (k) {
      var li = document.createElement('li');
      li.className = 'settings-item';
      li.setAttribute('data-key-id', k.id);
      var main = document.createElement('div');
      main.className = 'settings-main';
      main.appendChild(span('key-name', k.name));
      main.appendChild(span('key-prefix mono', k.prefix + '…'));
      main.appendChild(span('key-scope badge', k.scope));
      main.appendChild(span('key-used hint', 'last used ' + when(k.lastUsedAt)));
      li.appendChild(main);
      li.appendChild(button('btn-danger-ghost key-revoke', 'Revoke', function () {
        call('DELETE', '/api-keys/' + encodeURIComponent(k.id))
          .then(function () { ok(el.keyError); el.keyNew.hidden = true; return loadKeys(); })
          .catch(function (err) { fail(el.keyError, err); });
      }));
      el.keyList.appendChild(li);
    });
  }
  el.keyForm.addEventListener('submit', function (ev) {
    ev.preventDefault();
    el.keyCreate.disabled = true;
    call('POST', '/api-keys', { name: el.keyName.value.trim(), scope: el.keyScope.value })
      .then(function (made) {
        ok(el.keyError);
        el.keyNewValue.textContent = made.key;
        el.keyNew.hidden = false;
        el.keyName.value = '';
        return loadKeys();
      })
      .catch(function (err) { fail(el.keyError, err); })
      .then(function () { el.keyCreate.disabled = false; });
  });

  // ------------------------------------------------------------------ webhooks
  function loadHooks() {
    return call('GET', '/webhooks').then(renderHooks, function (err) { fail(el.hookError, err); });
  }
  function renderHooks(hooks) {
    clear(el.hookList);
    (hooks || []).forEach(function (h) {
      var li = document.createElement('li');
      li.className = 'settings-item hook-item';
      li.setAttribute('data-endpoint-id', h.id);
      li.setAttribute('data-enabled', String(h.enabled));
      var main = document.createElement('div');
      main.className = 'settings-main';
      main.appendChild(span('hook-url mono', h.url));
      main.appendChild(span('hook-events hint', h.events.join(', ')));
      main.appendChild(span('hook-state badge', h.enabled ? 'enabled' : 'disabled: ' + (h.disabledReason || '')));
      li.appendChild(main);
      var actions = document.createElement('div');
      actions.className = 'settings-actions';
      if (h.enabled) {
        actions.appendChild(button('btn-ghost hook-test', 'Send test', function () {
          call('POST', '/webhooks/' + encodeURIComponent(h.id) + '/test')
            .then(function () { ok(el.hookError); shown[h.id] = true; return loadDeliveries(h.id); })
            .catch(function (err) { fail(el.hookError, err); });
        }));
      } else {
        actions.appendChild(button('btn-ghost hook-enable', 'Enable', function () {
          call('PATCH', '/webhooks/' + encodeURIComponent(h.id), { enabled: true })
            .then(loadHooks).catch(function (err) { fail(el.hookError, err); });
        }));
      }
      actions.appendChild(button('btn-ghost hook-deliveries', 'Deliveries', function () {
        shown[h.id] = true;
        loadDeliveries(h.id);
      }));
      actions.appendChild(button('btn-danger-ghost hook-delete', 'Delete', function () {
        call('DELETE', '/webhooks/' + encodeURIComponent(h.id))
          .then(function () { delete shown[h.id]; ok(el.hookError); return loadHooks(); })
          .catch(function (err) { fail(el.hookError, err); });
      }));
      li.appendChild(actions);
      var list = document.createElement('ul');
      list.className = 'delivery-list';
      list.setAttribute('aria-label', 'Recent deliveries');
      li.appendChild(list);
      el.hookList.appendChild(li);
      if (shown[h.id]) loadDeliveries(h.id);
    });
  }
  function loadDeliveries(id) {
    clearTimeout(refreshTimers[id]);
    return call('GET', '/webhooks/' + encodeURIComponent(id) + '/deliveries?limit=10').then(function (page) {
      var item = el.hookList.querySelector('li[data-endpoint-id="' + CSS.escape(id) + '"] .delivery-list');
      if (!item) return;
      clear(item);
      var pending = false;
      page.items.forEach(function (d) {
        var li = document.createElement('li');
        li.setAttribute('data-delivery-id', d.id);
        li.setAttribute('data-status', d.status);
        var last = d.attempts.length ? d.attempts[d.attempts.length - 1] : null;
        li.appendChild(span('delivery-event', d.event));
        li.appendChild(span('delivery-status badge', d.status));
        li.appendChild(span('delivery-attempts hint', d.attempts.length + ' attempt' + (d.attempts.length === 1 ? '' : 's') +
          (last ? ' · ' + (last.statusCode !== null ? 'HTTP ' + last.statusCode : last.error) + ' · ' + last.durationMs + ' ms' : '')));
        item.appendChild(li);
        if (d.status === 'pending') pending = true;
      });
      if (!page.items.length) item.appendChild(span('hint', 'No deliveries yet.'));
      if (pending) refreshTimers[id] = setTimeout(function () { loadDeliveries(id); }, 1000);
    }, function (err) { fail(el.hookError, err); });
  }
  el.hookForm.addEventListener('submit', function (ev) {
    ev.preventDefault();
    var events = Array.prototype.filter.call(el.hookEvents.querySelectorAll('input[type=checkbox]'),
      function (c) { return c.checked; }).map(function (c) { return c.value; });
    el.hookCreate.disabled = true;
    call('POST', '/webhooks', { url: el.hookUrl.value.trim(), events: events })
      .then(function (made) {
        ok(el.hookError);
        el.hookNewSecret.textContent = made.secret;
        el.hookNew.hidden = false;
        el.hookUrl.value = '';
        return loadHooks();
      })
      .catch(function (err) { fail(el.hookError, err); })
      .then(function () { el.hookCreate.disabled = false; });
  });

  // ------------------------------------------------------------------ wiring
  el.panel.addEventListener('toggle', function () {
    if (!el.panel.open || !token()) return;
    el.keyNew.hidden = true;
    el.hookNew.hidden = true;
    clear(el.keyList);
    clear(el.hookList);
    shown = {};
    loadKeys();
    loadHooks();
  });
  window.addEventListener('droid:webhook.disabled', function (ev) {
    var d = ev.detail || {};
    note('Webhook endpoint disabled: ' + (d.disabledReason || d.url || ''));
    if (el.panel.open) loadHooks();
  });
})();
