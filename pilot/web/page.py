# -*- test-case-name: tests.web.test_dashboard -*-
"""
The dashboard's one HTML page: inline CSS and script, an SVG chart drawn by
the script, nothing fetched from elsewhere (it works on a network with no
internet).  The script polls ``/api/stats`` every :data:`POLL_SECONDS` and
writes every value with ``textContent`` (no markup from data).

:data:`CONTENT_SECURITY_POLICY` allows exactly this script and style (by
their SHA-256) and requests to this origin only.
"""

from __future__ import annotations

import base64
import hashlib

POLL_SECONDS = 5

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;background:#0f172a;color:#e2e8f0}
header{padding:16px 24px;background:#111827;border-bottom:1px solid #1f2937}
h1{font-size:18px;margin:0}h2{font-size:15px;margin:0 0 8px}
main{padding:16px 24px;display:grid;gap:16px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px}
.card,.panel{background:#1e293b;border-radius:8px;padding:12px 16px}
.label{color:#94a3b8;font-size:12px}.value{font-size:24px;font-weight:600;margin-top:4px}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:4px 8px;border-bottom:1px solid #334155}
td.n{text-align:right;font-variant-numeric:tabular-nums}
svg{width:100%;height:180px}.legend span{margin-right:16px}
.online{color:#38bdf8}.rps{color:#f472b6}#status{color:#94a3b8;font-size:12px}
"""

SCRIPT = """
(function(){
'use strict';
var POLL=%(poll)d*1000;
function fmt(n){return Number(n||0).toLocaleString('en-US');}
function bytes(n){var u=['B','KB','MB','GB','TB'],i=0;n=Number(n||0);
  while(n>=1024&&i<u.length-1){n/=1024;i++;}return (i?n.toFixed(1):String(n))+' '+u[i];}
function uptime(s){var d=Math.floor(s/86400),h=Math.floor(s%%86400/3600),m=Math.floor(s%%3600/60);
  return (d?d+'d ':'')+h+'h '+m+'m';}
function set(id,text){document.getElementById(id).textContent=text;}
function role(r){return r?r.role+' (term '+r.term+')':'unpaired';}
var NS='http://www.w3.org/2000/svg';
function line(svg,points,key,max,cls){
  if(points.length<2){return;}
  var t0=points[0].t,span=Math.max(points[points.length-1].t-t0,1),d=[];
  points.forEach(function(p){d.push(((p.t-t0)/span*1000).toFixed(1)+','+(170-p[key]/max*160).toFixed(1));});
  var el=document.createElementNS(NS,'polyline');
  el.setAttribute('points',d.join(' '));el.setAttribute('fill','none');
  el.setAttribute('stroke-width','2');el.setAttribute('class',cls);
  el.setAttribute('stroke',cls==='online'?'#38bdf8':'#f472b6');
  svg.appendChild(el);
}
function chart(points){
  var svg=document.getElementById('chart');
  while(svg.firstChild){svg.removeChild(svg.firstChild);}
  var maxOnline=1,maxRps=1;
  points.forEach(function(p){maxOnline=Math.max(maxOnline,p.online);maxRps=Math.max(maxRps,p.requests_per_second);});
  line(svg,points,'online',maxOnline,'online');
  line(svg,points,'requests_per_second',maxRps,'rps');
  set('chart-max','peak '+fmt(maxOnline)+' online, '+maxRps.toFixed(1)+' requests/s');
}
function relays(list){
  var body=document.getElementById('relays');
  while(body.firstChild){body.removeChild(body.firstChild);}
  if(!list.length){var r=body.insertRow(),c=r.insertCell();c.colSpan=2;c.textContent='no relayed traffic yet';return;}
  list.forEach(function(x){var r=body.insertRow();r.insertCell().textContent=x.address;
    var c=r.insertCell();c.className='n';c.textContent=bytes(x.bytes);});
}
function update(){
  fetch('/api/stats',{cache:'no-store'}).then(function(r){
    if(!r.ok){throw new Error('HTTP '+r.status);}return r.json();
  }).then(function(d){
    set('total-nodes',fmt(d.total_nodes));set('active-nodes',fmt(d.active_nodes));
    set('trust-links',fmt(d.total_trust_links));set('rps',Number(d.requests_per_second).toFixed(1));
    set('relayed-bytes',bytes(d.relayed_bytes));set('punches',fmt(d.punches));
    set('total-requests',fmt(d.total_requests));set('uptime',uptime(d.uptime_secs));
    set('role',role(d.replication));
    relays(d.top_relays);chart(d.history);
    set('status','updated '+new Date().toLocaleTimeString());
  }).catch(function(e){set('status','cannot reach the rendezvous: '+e.message);});
}
update();setInterval(update,POLL);
})();
""" % {"poll": POLL_SECONDS}

BODY = """<header><h1>Pilot rendezvous</h1><div id="status">loading</div></header>
<main>
<section class="cards">
<div class="card"><div class="label">Nodes</div><div class="value" id="total-nodes">-</div></div>
<div class="card"><div class="label">Online</div><div class="value" id="active-nodes">-</div></div>
<div class="card"><div class="label">Trust links</div><div class="value" id="trust-links">-</div></div>
<div class="card"><div class="label">Requests/s</div><div class="value" id="rps">-</div></div>
<div class="card"><div class="label">Requests</div><div class="value" id="total-requests">-</div></div>
<div class="card"><div class="label">Relayed</div><div class="value" id="relayed-bytes">-</div></div>
<div class="card"><div class="label">Punches</div><div class="value" id="punches">-</div></div>
<div class="card"><div class="label">Uptime</div><div class="value" id="uptime">-</div></div>
<div class="card"><div class="label">Role</div><div class="value" id="role">-</div></div>
</section>
<section class="panel"><h2>Last hour</h2>
<div class="legend"><span class="online">&#9632; nodes online</span><span class="rps">&#9632; requests/s</span>
<span id="chart-max"></span></div>
<svg id="chart" viewBox="0 0 1000 180" preserveAspectRatio="none" role="img" aria-label="chart"></svg>
</section>
<section class="panel"><h2>Busiest relayed nodes (public nodes)</h2>
<table><thead><tr><th>Address</th><th>Relayed</th></tr></thead><tbody id="relays"></tbody></table>
</section>
</main>"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        "<title>Pilot rendezvous</title><link rel=\"icon\" href=\"data:,\">"
        f"<style>{STYLE}</style></head>\n<body>\n{BODY}\n<script>{SCRIPT}</script>\n</body></html>\n"
        ).encode("utf-8")

CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
                           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'").encode("ascii")
