% rebase('layout', title='History', me=me, csrf=csrf)
<h1>History</h1>
<form method="get" action="/history">
  <label>Search by number or words <input name="q" value="{{query}}"></label>
  <button type="submit">Search</button>
</form>
<p><a href="/history.csv?q={{query}}">Download CSV</a></p>
<table>
<tr><th>arrived</th><th>code</th><th>from</th><th>status</th><th>taken by</th><th>to acknowledge</th></tr>
% for c in convs:
<tr><td>{{shown(c.created, c.timezone)}}</td><td><a href="/c/{{c.id}}">#{{c.code}}</a></td><td>{{c.sender}}</td>
<td>{{c.status}}</td><td>{{c.acknowledged_by or ''}}</td><td>{{say(tta(c))}}</td></tr>
% end
</table>
<p>Page {{page}} of {{pages}}
% if page > 1:
<a href="/history?q={{query}}&amp;page={{page - 1}}">Newer</a>
% end
% if page < pages:
<a href="/history?q={{query}}&amp;page={{page + 1}}">Older</a>
% end
</p>
<h2>Time to acknowledge</h2>
<table>
<tr><th>days</th><th>who</th><th>taken</th><th>median</th><th>90th percentile</th></tr>
% for f in figures:
<tr><td>{{f['days']}}</td><td>{{f['who']}}</td><td>{{f['count']}}</td><td>{{say(f['median'])}}</td><td>{{say(f['p90'])}}</td></tr>
% end
</table>
<h2>Failed deliveries</h2>
<ul>
% for f in failed:
<li><a href="/c/{{f['conv'].id}}">#{{f['conv'].code}}</a> {{f['page'].kind}} to {{f['page'].to}}: {{f['page'].state}} {{f['page'].error or ''}}</li>
% end
</ul>
