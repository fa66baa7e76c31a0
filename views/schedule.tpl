% rebase('layout', title='Schedule', me=me, csrf=csrf)
<h1>Schedule</h1>
% if said:
<p class="said">{{said}}</p>
% end
% if not rotations:
<p>No rotations in config.toml.</p>
% end
% for r in rotations:
<section>
<h2>{{r['rotation'].name}} ({{r['rotation'].timezone}})</h2>
<ul>
% for s in r['shifts']:
  <li>{{shown(s['start'], r['rotation'].timezone)}} to {{shown(s['end'], r['rotation'].timezone)}}: <strong>{{s['who'].name}}</strong>
  % if s['override']:
  (override {{s['override'].id}}, for {{s['override'].replaces}})
  % end
  </li>
% end
</ul>
<form method="post" action="/schedule/override">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <input type="hidden" name="rotation" value="{{r['rotation'].name}}">
  <label>Who <select name="member">
  % for m in r['rotation'].members:
    <option value="{{m.phone}}">{{m.name}}</option>
  % end
  </select></label>
  <label>From (blank: now) <input name="start" type="datetime-local" step="1"></label>
  <label>Until <input name="end" type="datetime-local" step="1" required></label>
  <button type="submit">Add override</button>
</form>
</section>
% end
<h2>Overrides</h2>
<ul>
% for o in overrides:
  <li>{{o.id}} {{o.rotation}}: {{o.name}} until {{shown(o.end, 'UTC')}}
  <form method="post" action="/schedule/override/{{o.id}}/delete" class="inline">
    <input type="hidden" name="csrf" value="{{csrf}}"><button type="submit">Delete</button>
  </form></li>
% end
</ul>
