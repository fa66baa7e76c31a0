% rebase('layout', title='Overview', me=me, csrf=csrf, refresh=15)
% for entry in lines:
<section>
  <h1>{{entry['line'].name}}</h1>
  <p>On call: <strong>{{entry['duty'].name}}</strong> {{entry['duty'].phone}}
  % if entry['until']:
  until {{shown(entry['until'], entry['zone'])}}
  % end
  </p>
  % if not entry['convs']:
  <p>Nothing open.</p>
  % end
  <ul class="convs">
  % for c in entry['convs']:
    <li>
      <a href="/c/{{c.id}}">#{{c.code}}</a> {{c.sender}}: {{c.messages[0]['body'][:80]}}
      <br><small>{{c.status}}, {{int((now - c.created) // 60)}} min old;
      % for p in c.pages:
      %   if p.kind in ('page', 'call'):
      step {{(p.step or 0) + 1}} {{p.kind}} to {{contact_at(c, p.step or 0).name}} {{p.state}};
      %   end
      % end
      % if c.is_open:
      next step due {{shown(c.deadline, c.timezone)}}
      % end
      </small>
    </li>
  % end
  </ul>
  % if entry['taken']:
  <h2>Taken in the last day</h2>
  <ul class="convs">
  % for c in entry['taken']:
    <li><a href="/c/{{c.id}}">#{{c.code}}</a> {{c.sender}}: {{c.messages[0]['body'][:80]}}
      <br><small>taken by {{c.acknowledged_by}} at {{shown(c.finished_at, c.timezone)}}</small></li>
  % end
  </ul>
  % end
</section>
% end
<section>
  <h2>Health</h2>
  <dl>
  % for name, value in health.items():
    <dt>{{name}}</dt><dd>{{value}}</dd>
  % end
  </dl>
</section>
