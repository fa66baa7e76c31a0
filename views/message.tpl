% rebase('layout', title='relay')
<p class="said">{{said}}</p>
<p><a href="/">Back</a></p>
